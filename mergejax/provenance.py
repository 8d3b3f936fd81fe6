"""What a run records next to its results: config, seed, package versions, time, memory."""

from __future__ import annotations

import fnmatch
import importlib.metadata
import json
import platform
import resource
import sys
import time
from typing import Any

import jax

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "ml_collections", "numpy")


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
  """Returns {package: installed version} ("not installed" where missing)."""
  out = {"python": sys.version.split()[0]}
  for name in packages:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = "not installed"
  return out


def peak_rss_mib() -> float:
  """Returns this process's peak resident set size so far, in MiB (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def record(config: Any = None, *, seed: int | None = None, started: float | None = None) -> dict:
  """Returns a provenance dict: config, seed, versions, platform, devices, wall time, peak RSS.

  Args:
    config: an ml_collections ConfigDict (or dict) describing the run.
    seed: the run's seed.
    started: `time.time()` at the start of the run, to record the wall time.

  Returns:
    A JSON-serializable dict.
  """
  if config is not None and hasattr(config, "to_dict"):
    config = config.to_dict()
  return {
    "config": config,
    "seed": seed,
    "versions": package_versions(),
    "platform": platform.platform(),
    "devices": [str(d) for d in jax.devices()],
    "wall_time_s": None if started is None else round(time.time() - started, 3),
    "peak_rss_mib": round(peak_rss_mib(), 1),
    "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
  }


def config_fingerprint(config: Any, *, ignore: tuple[str, ...] = ()) -> dict[str, Any]:
  """Returns the config as a flat, JSON-friendly `{"a.b.c": value}`, without `ignore`d fields.

  What a resumable run compares with the config it was started with: every field counts except
  those that may legitimately change on resume (e.g. the number of steps).

  Args:
    config: a ConfigDict or nested dict.
    ignore: fnmatch patterns over the dotted field names (e.g. "train.steps", "ckpt.*").

  Returns:
    The flat dict; tuples become lists, as JSON would make them.
  """
  tree = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  flat: dict[str, Any] = {}

  def walk(prefix: str, node: Any) -> None:
    if isinstance(node, dict):
      for k in sorted(node):
        walk(f"{prefix}.{k}" if prefix else str(k), node[k])
      return
    if any(fnmatch.fnmatchcase(prefix, pattern) for pattern in ignore):
      return
    flat[prefix] = json.loads(json.dumps(node, default=str))

  walk("", tree)
  return flat


def fingerprint_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """Returns one line per field that differs between two fingerprints ("a.b: old -> new")."""
  lines = []
  for key in sorted(saved.keys() | current.keys()):
    old, new = saved.get(key, "<absent>"), current.get(key, "<absent>")
    if old != new:
      lines.append(f"{key}: {old!r} -> {new!r}")
  return lines
