"""The C allocator's policy for one-shot merges: freed memory is kept and reused, not unmapped.

glibc serves each large allocation (from 128 KB to 32 MB, by its adaptive threshold, and every
one above) with a fresh `mmap` and unmaps it when freed. XLA's CPU buffers for one leaf's program
(outputs, temporaries, copies of unaligned inputs) are that large, so every leaf faulted in new
pages that the kernel had to zero: 82K page faults per call of a TIES program on a 8192 x 2048
bf16 leaf with 8 experts, 0.16-0.24 s a call, against 0.06 s and 1 fault with the memory
reused. On the one-shot CLI's 22M x 8 fp32 workload that took EMR (8 task models per leaf) from
10.5-12.5 s to 7.3-8.5 s wall; at full size `clear_page` took 23% of the CPU samples of a TIES
merge.

`keep_freed_memory` turns that off for the process: allocations come from the heap, and freed
memory is kept for the next one. The process then holds its peak working set until it exits,
which suits a one-shot command (launch/merge.py calls it) more than a long-lived notebook.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt's parameters (glibc's malloc.h).
_KEEP_BYTES = 2**31 - 1  # Freed memory at the heap's top is kept up to this much (int's largest).


@functools.cache
def keep_freed_memory() -> bool:
  """Asks glibc's malloc to serve large allocations from its heap and to keep freed memory.

  Process-wide and not undone; idempotent. A no-op where the C library is not glibc.

  Returns:
    Whether the policy is in place (False without glibc's `mallopt`).
  """
  name = ctypes.util.find_library("c")
  try:
    mallopt = ctypes.CDLL(name).mallopt
  except (OSError, AttributeError, TypeError):
    return False
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  # No mmap for large requests (a thread's arena still maps one it cannot hold), and no trim.
  ok = mallopt(_M_MMAP_MAX, 0) == 1
  return ok and mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES) == 1
