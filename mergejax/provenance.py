"""What a run records next to its results: config, seed, package versions, time, memory."""

from __future__ import annotations

import importlib.metadata
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
