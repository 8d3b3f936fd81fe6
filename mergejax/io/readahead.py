"""Advice to the kernel on how memory-mapped inputs will be read.

A pass over memory-mapped checkpoints reads them through page faults. `will_need` asks for a
leaf's pages before the pass reaches them: one bf16 pair (2 GB, cold), subtracted in 128K-entry
steps, took 2.88 s faulting its way through and 1.96 s with its pages asked for 64 MB ahead.
`sampling` does the opposite for scattered reads: each fault then reads its own page, not the
device's read-ahead around it (8 MB here), so a sample of blocks costs about its size.
Full size (1.2B x 9 bf16, cold, alternating runs): TIES's statistics pass took 70.3 and 73.5 s
without either, 55.5 and 58.9 s with both.
"""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Iterator

import numpy as np


def _mapping(x: np.ndarray) -> tuple[mmap.mmap, int] | None:
  """The `mmap` behind `x` (a view of an `np.memmap`) and the address of its first byte."""
  root = x
  while isinstance(root.base, np.ndarray):
    root = root.base
  if not isinstance(root.base, mmap.mmap) or not isinstance(root, np.memmap):
    return None
  # np.memmap maps from the allocation granule holding its offset: its data starts that far in.
  return root.base, root.ctypes.data - (root.offset or 0) % mmap.ALLOCATIONGRANULARITY


def _advise(option: int, arrays) -> None:
  for x in arrays:
    if not isinstance(x, np.ndarray) or not x.flags.c_contiguous or x.nbytes == 0:
      continue
    found = _mapping(x)
    if found is None:
      continue
    mapped, start = found
    begin = x.ctypes.data - start
    end = begin + x.nbytes
    begin -= begin % mmap.PAGESIZE
    try:
      mapped.madvise(option, begin, end - begin)
    except (OSError, ValueError):  # Advice only: a mapping that refuses it is read as it was.
      pass


def will_need(*arrays) -> None:
  """Starts reading the file pages behind memory-mapped arrays, returning at once.

  Args:
    *arrays: arrays or None; those that are not contiguous views of an `np.memmap` (copies,
      device arrays, None) are skipped.
  """
  _advise(mmap.MADV_WILLNEED, arrays)


@contextlib.contextmanager
def sampling(*arrays) -> Iterator[None]:
  """Within: a page fault on these memory-mapped arrays reads its own page alone.

  A fault normally reads the pages around it too (the device's read-ahead: 8 MB here), so a
  sample of scattered blocks read most of each file, and a pass over the model right after
  found those pages evicted again (22 GB of inputs, 21 GB of page cache).

  Args:
    *arrays: as for `will_need`.
  """
  _advise(mmap.MADV_RANDOM, arrays)
  try:
    yield
  finally:
    _advise(mmap.MADV_NORMAL, arrays)
