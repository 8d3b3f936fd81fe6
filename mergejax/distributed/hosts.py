"""Several hosts: `jax.distributed.initialize` from a config, the primary process, host copies.

A multi-host run starts the same command on every host; `initialize` connects them (before any
other JAX call), after which `jax.devices()` lists every host's devices and a `Mesh` spans them.
Each host places only its own slices (`layout.put`); `to_host` brings a global array back as
NumPy on every process (a collective: all processes call it, in the same order), and only the
primary process writes files ("one writer per output file").
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

FIELDS = ("coordinator_address", "num_processes", "process_id")
_STARTED = {"done": False}


def cluster_detected() -> str | None:
  """The launcher JAX would recognize by itself (a multi-task SLURM job, Open MPI, a TPU pod
  slice), or None."""
  if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in os.environ:
    return "SLURM"
  if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return "Open MPI"
  if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
    return "TPU pod"
  return None


def initialize(distributed: Any = None) -> bool:
  """Connects this process to the others of a multi-host run (once; a no-op afterwards).

  Args:
    distributed: a config section (ConfigDict or dict) with `coordinator_address` ("host:port"
      of process 0), `num_processes` and `process_id`. Any field set calls
      `jax.distributed.initialize` with the fields that are set (JAX detects the others where
      it can); none set calls it with no arguments when `cluster_detected()` finds a launcher
      JAX knows (TPU pods, SLURM, Open MPI), and does nothing otherwise (one process).

  Returns:
    Whether this run has several processes.
  """
  fields = {k: (distributed or {}).get(k) for k in FIELDS}
  fields = {k: v for k, v in fields.items() if v is not None}
  if _STARTED["done"]:
    return jax.process_count() > 1
  if fields or cluster_detected():
    logging.info("jax.distributed.initialize(%s)", fields or cluster_detected())
    jax.distributed.initialize(**fields)
  _STARTED["done"] = True
  return jax.process_count() > 1


def is_primary() -> bool:
  """Whether this process writes the run's files (process 0)."""
  return jax.process_index() == 0


def to_host(x: Any) -> np.ndarray:
  """`x` as a NumPy array on this process (a collective when `x` spans other processes' devices).

  Args:
    x: a jax array (any sharding), or anything `np.asarray` takes.

  Returns:
    The whole array.
  """
  if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def sync(name: str) -> None:
  """Waits until every process gets here (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
