"""The safetensors reader and writer: strict validation, errors naming the file, fuzzing.

The reference for "valid" is the safetensors library itself (`safetensors.deserialize`, Rust):
whatever mergejax loads, the library loads to the same tensors.
"""

import json
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors as st_lib
import safetensors.numpy as st_numpy

from mergejax.io import safetensors


def _tensors():
  return {
    "a.weight": np.arange(32, dtype=np.float32).reshape(4, 8),
    "a.bias": np.array([1.5, -2.0, 3.25], np.float32),
    "b.half": np.array([[1, 2], [3, 4]], np.float16),
    "c.bf16": np.array([0.5, -1.0, 7.0], ml_dtypes.bfloat16),
    "d.ids": np.array([2**33 + 5, -1, 0], np.int64),
    "e.mask": np.array([True, False, True]),
    "f.empty": np.zeros((0, 4), np.float32),
    "g.scalar": np.array(3.0, np.float64),
  }


def _raw(header: dict, data: bytes, pad: int = 0) -> bytes:
  blob = json.dumps(header).encode() + b" " * pad
  return struct.pack("<Q", len(blob)) + blob + data


def _library_load(raw: bytes) -> dict | None:
  try:
    return {k: v for k, v in st_lib.deserialize(raw)}
  except Exception:  # noqa: BLE001 (any refusal of the reference counts as "invalid")
    return None


def _assert_same_as_library(loaded: dict, reference: dict) -> None:
  assert set(loaded) == set(reference)
  for k, a in loaded.items():
    ref = reference[k]
    assert safetensors._NAMES[a.dtype] == ref["dtype"], k
    assert list(a.shape) == list(ref["shape"]), k
    assert a.tobytes() == bytes(ref["data"]), k


def test_round_trip_exact_and_aligned(tmp_path):
  path = tmp_path / "m.safetensors"
  tensors = _tensors()
  size = safetensors.write_safetensors(path, tensors)
  assert size == path.stat().st_size
  loaded = safetensors.read_safetensors(path)
  assert list(loaded) == sorted(tensors, key=lambda k: (tensors[k].nbytes % 64 != 0, k))
  for k, v in tensors.items():
    assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape
    np.testing.assert_array_equal(loaded[k], v)
  assert int(loaded["d.ids"][0]) == 2**33 + 5  # int64 is not narrowed.
  assert loaded["a.weight"].ctypes.data % 64 == 0  # 128 bytes: written first, aligned.
  _assert_same_as_library(loaded, _library_load(path.read_bytes()))


def test_files_of_the_library_load(tmp_path):
  path = tmp_path / "lib.safetensors"
  plain = {k: v for k, v in _tensors().items() if v.dtype != ml_dtypes.bfloat16}
  st_numpy.save_file(plain, str(path))
  for k, v in safetensors.read_safetensors(path).items():
    np.testing.assert_array_equal(v, plain[k])


@pytest.mark.parametrize(
  "raw, message",
  [
    (b"", "0 bytes, fewer than the 8"),
    (b"\x01\x02", "2 bytes, fewer than the 8"),
    (struct.pack("<Q", 10**9) + b"{}", "exceeds the 100 MB limit"),
    (struct.pack("<Q", 50) + b"{}", "runs past the end of the file"),
    (struct.pack("<Q", 2) + b"\xff\xfe", "not UTF-8 JSON"),
    (struct.pack("<Q", 4) + b"[1] ", "not a JSON object"),
    (struct.pack("<Q", 3) + b"{x}", "not UTF-8 JSON"),
  ],
)
def test_malformed_headers_name_the_file(tmp_path, raw, message):
  path = tmp_path / "bad.safetensors"
  path.write_bytes(raw)
  with pytest.raises(safetensors.SafetensorsError, match=message) as e:
    safetensors.read_safetensors(path)
  assert str(e.value).startswith(str(path))


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
  return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize(
  "header, data, message",
  [
    ({"x": _entry(shape=(8,))}, bytes(28), r"needs 32 bytes but its data_offsets \[0, 8\] span 8"),
    ({"x": _entry(), "y": _entry(offsets=(4, 12))}, bytes(12), "overlaps"),
    ({"x": _entry(), "y": _entry(offsets=(12, 20))}, bytes(20), "leaves a gap"),
    ({"x": _entry()}, bytes(12), "trailing bytes"),
    ({"x": _entry(shape=(4,), offsets=(0, 16))}, bytes(8), "truncated"),
    ({"x": _entry(dtype="F33")}, bytes(8), "unknown dtype 'F33'"),
    ({"x": _entry(shape=(2.0,))}, bytes(8), "not a list of sizes"),
    ({"x": _entry(shape=(-2,))}, bytes(8), "not a list of sizes"),
    ({"x": _entry(offsets=(0,))}, bytes(8), r"not \[begin, end\]"),
    ({"x": {"dtype": "F32", "shape": [2]}}, bytes(8), "lacks dtype, shape or data_offsets"),
    ({"__metadata__": {"a": 1}, "x": _entry()}, bytes(8), "__metadata__"),
    ({"x": _entry(offsets=(8, 0))}, bytes(8), "span -8"),
  ],
)
def test_inconsistent_headers_name_the_file_and_tensor(tmp_path, header, data, message):
  path = tmp_path / "bad.safetensors"
  path.write_bytes(_raw(header, data))
  with pytest.raises(safetensors.SafetensorsError, match=message) as e:
    safetensors.read_safetensors(path)
  assert str(e.value).startswith(str(path))
  assert _library_load(path.read_bytes()) is None  # The library refuses each of them too.


def test_duplicate_names_are_refused(tmp_path):
  path = tmp_path / "dup.safetensors"
  blob = b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
  blob += b'"x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'
  path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(8))
  with pytest.raises(safetensors.SafetensorsError, match="duplicate key 'x'"):
    safetensors.read_safetensors(path)


def test_writer_refuses_unknown_dtypes_before_writing(tmp_path):
  path = tmp_path / "x.safetensors"
  with pytest.raises(TypeError, match="Tensor 'c' has dtype complex64"):
    safetensors.write_safetensors(path, {"c": np.zeros(2, np.complex64)})
  assert list(tmp_path.iterdir()) == []


class _InPieces:
  """A tensor given as 1-D pieces, as a `streaming.LazyLeaf` of a leaf merged in flat chunks."""

  def __init__(self, array, cuts, dtype=None):
    self.shape, self.dtype = array.shape, np.dtype(dtype or array.dtype)
    self._pieces = np.split(array.reshape(-1), cuts)

  def pieces(self):
    return self._pieces


def test_writer_writes_tensors_given_in_pieces(tmp_path):
  a = np.arange(24, dtype=np.float32).reshape(4, 6)
  b = np.arange(5, dtype=ml_dtypes.bfloat16)
  path = tmp_path / "x.safetensors"
  safetensors.write_safetensors(path, {"a": _InPieces(a, [5, 16]), "b": _InPieces(b, [])})
  back = safetensors.read_safetensors(path)
  np.testing.assert_array_equal(back["a"], a)
  np.testing.assert_array_equal(back["b"], b)
  assert back["b"].dtype == ml_dtypes.bfloat16


def test_writer_refuses_pieces_unlike_the_header_and_leaves_nothing(tmp_path):
  path = tmp_path / "x.safetensors"
  short = _InPieces(np.zeros((2, 3), np.float32), [2])
  short._pieces = short._pieces[:1]  # 2 of 6 entries.
  with pytest.raises(ValueError, match="Tensor 'a' produced float32 \\(2,\\), not what"):
    safetensors.write_safetensors(path, {"a": short})
  wrong = _InPieces(np.zeros((2, 3), np.float32), [3], dtype=np.int32)
  with pytest.raises(ValueError, match="Tensor 'w' produced float32 \\(3,\\), float32 \\(3,\\)"):
    safetensors.write_safetensors(path, {"w": wrong})
  assert list(tmp_path.iterdir()) == []


def test_lazy_file_reads_header_only(tmp_path):
  path = tmp_path / "m.safetensors"
  safetensors.write_safetensors(path, _tensors())
  f = safetensors.SafetensorsFile(path)
  assert f.info("a.weight").shape == (4, 8) and f._mmap is None
  np.testing.assert_array_equal(f["a.bias"], _tensors()["a.bias"])
  assert f.nbytes == sum(v.nbytes for v in _tensors().values())


@pytest.mark.parametrize("writer", ["mergejax", "library"])
def test_fuzz_truncations_and_byte_flips(tmp_path, writer):
  """Each mutation ends in an error naming the file or in the library's own reading of it."""
  path = tmp_path / "m.safetensors"
  tensors = {k: v for k, v in _tensors().items() if v.dtype != ml_dtypes.bfloat16}
  if writer == "mergejax":
    safetensors.write_safetensors(path, tensors)
  else:
    st_numpy.save_file(tensors, str(path))
  good = path.read_bytes()
  header_end = 8 + struct.unpack("<Q", good[:8])[0]
  rng = np.random.default_rng(0)
  bad = tmp_path / "mutant.safetensors"
  loads = errors = 0
  for trial in range(400):
    raw = bytearray(good)
    if trial < 100:
      raw = raw[: rng.integers(0, len(good))]
    else:
      # Mostly in the header, where a flip can change the meaning; some in the data.
      end = header_end if trial % 4 else len(raw)
      for _ in range(rng.integers(1, 4)):
        raw[rng.integers(0, end)] = rng.integers(0, 256)
    bad.write_bytes(bytes(raw))
    try:
      loaded = safetensors.read_safetensors(bad)
    except safetensors.SafetensorsError as e:
      assert str(e).startswith(str(bad))
      errors += 1
      continue
    reference = _library_load(bytes(raw))
    assert reference is not None, f"trial {trial}: mergejax loaded what the library refuses"
    _assert_same_as_library(loaded, reference)
    loads += 1
  assert errors >= 100 and loads > 0  # Every truncation failed; some flips are harmless.
