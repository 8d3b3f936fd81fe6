"""A benchmark's model zoo on disk: one orbax checkpoint per hash of (zoo config, seed).

`<cache_dir>/<key>/params` holds the pytree and `<cache_dir>/<key>/zoo.json` the build record;
the JSON is written last, so its presence marks a complete entry (a killed build leaves no file
that looks like a finished zoo).
"""

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from mergejax import provenance
from mergejax.io import atomic, checkpoint

META = "zoo.json"
PARAMS = "params"


def config_key(config: Mapping[str, Any] | Any, seed: int, *, prefix: str = "") -> str:
  """Returns a 16-hex-digit hash of a config (ConfigDict or mapping) and a seed.

  Args:
    config: what determines the zoo (a ConfigDict's `to_dict()` is taken).
    seed: the run's seed.
    prefix: prepended to the hash (e.g. "synthvision-"), to tell benchmarks apart.

  Returns:
    The key, also the name of the cache sub-directory.
  """
  cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  blob = json.dumps({"zoo": cfg, "seed": seed}, sort_keys=True, default=list)
  return prefix + hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_or_build(
  root: str | Path, key: str, build: Callable[[], tuple[Any, dict[str, Any]]]
) -> tuple[Any, dict[str, Any], bool]:
  """Loads `<root>/<key>` or calls `build()` and stores its result there.

  Args:
    root: the cache directory (`~` is expanded).
    key: the entry's name (see `config_key`).
    build: returns (pytree of arrays, JSON-serializable record); called only on a miss.

  Returns:
    (pytree as jax arrays, record with "key", "build_seconds" and "versions" added on a build,
    whether it was a cache hit).
  """
  entry = Path(root).expanduser() / key
  meta_path = entry / META
  if meta_path.exists():
    tree = checkpoint.load_pytree(entry / PARAMS)
    return jax.tree.map(jnp.asarray, tree), json.loads(meta_path.read_text()), True
  start = time.time()
  tree, record = build()
  record = {
    "key": key,
    **record,
    "build_seconds": round(time.time() - start, 2),
    "versions": provenance.package_versions(),
  }
  checkpoint.save_pytree(entry / PARAMS, tree)
  with atomic.atomic_file(meta_path) as tmp:
    tmp.write_text(json.dumps(record, indent=2, default=list))
  return tree, record, False
