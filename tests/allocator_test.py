"""`allocator.keep_freed_memory`: a large buffer freed and allocated again reuses its pages."""

import platform
import subprocess
import sys

import pytest

# In a fresh process (the policy is process-wide): page faults of touching a freshly allocated
# 64 MB buffer, the second time such a buffer is allocated.
_FAULTS = """
import resource, sys
import numpy as np
from mergejax import allocator
if sys.argv[1] == "keep":
  assert allocator.keep_freed_memory()
def faults_of_a_fresh_buffer():
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  x = np.empty(1 << 24, np.float32)
  x[::1024] = 1.0  # One write per 4 KB page.
  del x
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_a_fresh_buffer()
print(faults_of_a_fresh_buffer())
"""


def _faults(mode: str) -> int:
  out = subprocess.run(
    [sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True
  )
  return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_reused_not_faulted_in_again():
  default, kept = _faults("default"), _faults("keep")
  # 64 MB is 16384 pages: glibc's default maps (and the kernel zeroes) them anew each time,
  # unless transparent huge pages back the mapping (then 32 faults of 2 MB).
  assert kept < 64, (default, kept)
  assert default > kept, (default, kept)


def test_is_in_place_under_glibc_and_idempotent():
  code = "from mergejax import allocator as a; print(a.keep_freed_memory(), a.keep_freed_memory())"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  glibc = platform.libc_ver()[0] == "glibc"
  assert out.stdout.split() == [str(glibc)] * 2
