"""`io.advice`: random-access advice for the sampled memory-mapped leaves, nothing else."""

import ctypes
import mmap

import numpy as np

from mergejax.io import advice


def test_mapped_views_are_advised_random_then_normal(tmp_path, monkeypatch):
  path = tmp_path / "x.bin"
  np.arange(4 * mmap.PAGESIZE, dtype=np.uint16).tofile(path)  # 8 pages.
  mapped = np.memmap(path, np.uint16, mode="r")
  view = mapped[mmap.PAGESIZE + 10 : 3 * mmap.PAGESIZE].reshape(2, -1)
  calls = []
  real = advice._madvise
  monkeypatch.setattr(
    advice, "_madvise", lambda a, n, how: (calls.append((a, n, how)), real(a, n, how))[1]
  )
  plain = np.zeros(100)
  with advice.random_access([view, plain, None]):
    assert [c[2] for c in calls] == [mmap.MADV_RANDOM]
    assert int(view.sum()) == int(np.arange(mmap.PAGESIZE + 10, 3 * mmap.PAGESIZE).sum())
  assert [c[2] for c in calls] == [mmap.MADV_RANDOM, mmap.MADV_NORMAL]
  address, length, _ = calls[0]
  low = view.ctypes.data
  assert address % mmap.PAGESIZE == 0 and address <= low < address + mmap.PAGESIZE
  assert address + length == low + view.nbytes  # Exactly the view's pages.
  assert real(address, length, mmap.MADV_RANDOM) == 0, ctypes.get_errno()  # The kernel agrees.
  real(address, length, mmap.MADV_NORMAL)


def test_sampled_yields_the_leaves_advised_while_held(tmp_path, monkeypatch):
  path = tmp_path / "x.bin"
  np.ones(3 * mmap.PAGESIZE, np.float32).tofile(path)
  mapped = np.memmap(path, np.float32, mode="r")
  leaves = [(mapped[:10], [mapped[10:20], mapped[20:30]]), (None, [np.ones(3)])]
  calls = []
  monkeypatch.setattr(advice, "_madvise", lambda a, n, how: calls.append(how))
  got = []
  for base, experts in advice.sampled(leaves):
    got.append((base, experts))
    assert calls[-1] == mmap.MADV_RANDOM or base is None
  assert got == leaves and calls == [mmap.MADV_RANDOM] * 3 + [mmap.MADV_NORMAL] * 3
