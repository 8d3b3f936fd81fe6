"""Reading memory-mapped inputs ahead of their use, so disk reads overlap the merge's compute.

A streaming merge reads its inputs where XLA or NumPy first touches them: page faults in the
computing thread, which waits for the disk. `ReadAhead` touches one byte per page of the next
steps' arrays in a background thread, at most `window` bytes ahead of the step in progress, so the
pages are in the page cache when the step comes (page cache, not anonymous memory: no budget is
spent). madvise(MADV_WILLNEED) and posix_fadvise read nothing ahead on the machine this was
measured on; touching does. Arrays that are not memory-mapped files are skipped.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Sequence

import numpy as np

WINDOW = 1 << 30  # Bytes read ahead of the step in progress at most.


def file_backed(x) -> bool:
  """Whether `x` is a view of a memory-mapped file (a `np.memmap` in its chain of bases)."""
  while isinstance(x, np.ndarray):
    if isinstance(x, np.memmap):
      return True
    x = x.base
  return isinstance(x, mmap.mmap)


def touch(x: np.ndarray) -> None:
  """Reads one byte of every page of a contiguous array (its pages into the page cache)."""
  if x.nbytes and x.flags.c_contiguous:
    np.add.reduce(x.reshape(-1).view(np.uint8)[:: mmap.PAGESIZE], dtype=np.uint64)


class ReadAhead:
  """Touches the memory-mapped arrays of `steps` in order, in a daemon thread, up to `window`
  bytes beyond the step the consumer has `reached`. Use as a context manager (or `close()`).

  Args:
    steps: per step, the arrays it reads (others than memory-mapped files are skipped).
    window: bytes ahead at most.
  """

  def __init__(self, steps: Sequence[Sequence[np.ndarray]], window: int = WINDOW):
    self._steps = [[np.asarray(x) for x in arrays if file_backed(x)] for arrays in steps]
    sizes = [sum(x.nbytes for x in arrays) for arrays in self._steps]
    self._ends = np.cumsum([0, *sizes])  # Bytes before each step.
    self._window, self._reached, self._stop = window, 0, False
    self._cv = threading.Condition()
    self._thread = None
    if self._ends[-1]:  # Nothing memory-mapped, nothing to do.
      self._thread = threading.Thread(target=self._run, daemon=True, name="read-ahead")
      self._thread.start()

  @classmethod
  def of_leaves(cls, base, experts, paths: Sequence[str]) -> ReadAhead:
    """Steps of a merge's leaves: `base[path]` and each expert's, per path of `paths`."""
    return cls([[base[p], *(e[p] for e in experts)] for p in paths])

  def reached(self, step: int) -> None:
    """The consumer starts `step` (earlier steps are done or in progress)."""
    with self._cv:
      self._reached = max(self._reached, step)
      self._cv.notify()

  def close(self) -> None:
    with self._cv:
      self._stop = True
      self._cv.notify()

  def __enter__(self) -> ReadAhead:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _run(self) -> None:
    for i, arrays in enumerate(self._steps):
      with self._cv:
        # Beyond the next step and the window from the step in progress: wait for the consumer.
        while (
          not self._stop
          and i > self._reached + 1
          and self._ends[i + 1] - self._ends[self._reached] > self._window
        ):
          self._cv.wait()
        if self._stop:
          return
        if i < self._reached:  # Already read by the consumer.
          continue
      for x in arrays:
        touch(x)
