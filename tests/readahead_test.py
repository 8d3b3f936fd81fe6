"""Read-ahead advice on memory-mapped inputs: the right byte ranges, the right flags, no errors
on arrays that are not mapped."""

import mmap

import numpy as np
import pytest

from mergejax.io import readahead, safetensors


def _vma_flags(address: int) -> set[str]:
  """The kernel's VmFlags of the mapping holding `address` (/proc/self/smaps)."""
  inside = False
  with open("/proc/self/smaps") as f:
    for line in f:
      head = line.split()[0]
      if "-" in head and not head.endswith(":"):
        lo, hi = (int(v, 16) for v in head.split("-"))
        inside = lo <= address < hi
      elif inside and head == "VmFlags:":
        return set(line.split()[1:])
  raise AssertionError(f"no mapping holds {address:#x}")


@pytest.fixture
def mapped(tmp_path):
  tensors = {
    "a": np.arange(3 * mmap.PAGESIZE, dtype=np.float32).reshape(3, -1),
    "b": np.ones(5, np.float32),
  }
  path = tmp_path / "m.safetensors"
  safetensors.write_safetensors(path, tensors)
  return safetensors.SafetensorsFile(path)


def test_mapping_points_at_the_tensors_bytes_in_the_file(mapped):
  for name in ("a", "b"):
    x = np.asarray(mapped[name])  # A plain view of the memmap, as the engine holds it.
    found = readahead._mapping(x)
    assert found is not None
    data, start = found
    offset = x.ctypes.data - start
    assert offset == mapped.info(name).begin
    assert data[offset : offset + x.nbytes] == x.tobytes()


def test_sampling_turns_off_read_around_then_restores_it(mapped):
  x = np.asarray(mapped["a"])
  assert "rr" not in _vma_flags(x.ctypes.data)
  with readahead.sampling(x, None):
    assert "rr" in _vma_flags(x.ctypes.data)  # MADV_RANDOM: no read-around on faults.
    row = mmap.PAGESIZE  # Entries per row of "a": its second row starts there.
    np.testing.assert_array_equal(x[1, :4], np.arange(row, row + 4, dtype=np.float32))
  assert "rr" not in _vma_flags(x.ctypes.data)


def test_arrays_not_mapped_are_skipped():
  plain = np.ones((4, 4), np.float32)
  readahead.will_need(plain, plain[:, 1], np.ones(0), None, 3.0)
  with readahead.sampling(plain, None):
    pass
  assert readahead._mapping(plain) is None
