"""safetensors files: the project's one reader and one writer (memory-mapped, validated, no pickle).

The format: 8 bytes little-endian header length N, N bytes of UTF-8 JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`, then the
tensor bytes. Reading validates the header as strictly as the safetensors library does (header
within the file and at most 100 MB; known dtypes; byte sizes that match shape x dtype; offsets
that tile the data region exactly: no overlap, no gap, nothing past the end) and then returns
read-only numpy views of a memory map, so nothing is read until used. Every error names the file.

Writing puts tensors whose byte size is a multiple of 64 first and pads the header so the data
starts 64-byte aligned: those tensors' views are aligned, which lets XLA on CPU use them in place
(no host copy) when they are passed to a jitted function.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from mergejax.io import atomic, direct

MAX_HEADER_BYTES = 100_000_000  # The safetensors library's limit.
ALIGN = 64  # Bytes; what XLA's CPU client needs to alias a host buffer.

DTYPES = {
  "F64": np.dtype(np.float64),
  "F32": np.dtype(np.float32),
  "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
  "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
  "I64": np.dtype(np.int64),
  "I32": np.dtype(np.int32),
  "I16": np.dtype(np.int16),
  "I8": np.dtype(np.int8),
  "U64": np.dtype(np.uint64),
  "U32": np.dtype(np.uint32),
  "U16": np.dtype(np.uint16),
  "U8": np.dtype(np.uint8),
  "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
  """A file that is not a valid safetensors file; the message starts with its path."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Where one tensor lies in its file."""

  dtype: np.dtype
  shape: tuple[int, ...]
  begin: int  # Byte offset from the start of the file.
  nbytes: int


class SafetensorsFile(Mapping):
  """A validated safetensors file: `{name: read-only view}`, each view made on first access.

  Nothing but the header is read when it is opened; `info(name)` gives a tensor's dtype and
  shape without touching its data. Use `read_safetensors` for a plain dict.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    self.infos, self.metadata, self.file_size = read_header(self.path)
    self._mmap = None

  def info(self, name: str) -> TensorInfo:
    return self.infos[name]

  def __getitem__(self, name: str) -> np.ndarray:
    info = self.infos[name]
    if self._mmap is None:
      self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
    raw = self._mmap[info.begin : info.begin + info.nbytes]
    return raw.view(info.dtype).reshape(info.shape)

  def __iter__(self) -> Iterator[str]:
    return iter(self.infos)

  def __len__(self) -> int:
    return len(self.infos)

  @property
  def nbytes(self) -> int:
    return sum(i.nbytes for i in self.infos.values())


def _fail(path: pathlib.Path, what: str) -> SafetensorsError:
  return SafetensorsError(f"{path}: {what}; the file is not a valid safetensors file.")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
  out = {}
  for k, v in pairs:
    if k in out:
      raise ValueError(f"duplicate key {k!r}")
    out[k] = v
  return out


def _is_uint(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_header(path: pathlib.Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
  """Reads and validates the header of a safetensors file.

  Args:
    path: the file.

  Returns:
    `(infos, metadata, file_size)`: `{name: TensorInfo}` in header order, the `__metadata__`
    dict (empty if none) and the file's size.

  Raises:
    SafetensorsError: naming the file and what is wrong with it.
    OSError: the file cannot be opened.
  """
  path = pathlib.Path(path)
  with open(path, "rb") as f:
    size = os.fstat(f.fileno()).st_size
    if size < 8:
      raise _fail(path, f"it has {size} bytes, fewer than the 8 of the header length")
    n = int.from_bytes(f.read(8), "little")
    if n > MAX_HEADER_BYTES:
      raise _fail(path, f"its header length {n} exceeds the 100 MB limit")
    if 8 + n > size:
      raise _fail(path, f"its header length {n} runs past the end of the file ({size} bytes)")
    raw = f.read(n)
  try:
    header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
  except (UnicodeDecodeError, ValueError) as e:  # json.JSONDecodeError is a ValueError.
    raise _fail(path, f"its header is not UTF-8 JSON ({e})") from None
  if not isinstance(header, dict):
    raise _fail(path, "its header is not a JSON object")
  metadata = header.pop("__metadata__", None) or {}
  if not isinstance(metadata, dict) or not all(
    isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
  ):
    raise _fail(path, "its __metadata__ is not a map of strings to strings")
  start, infos = 8 + n, {}
  for name, entry in header.items():
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
      raise _fail(path, f"tensor {name!r} lacks dtype, shape or data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
      raise _fail(path, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
      raise _fail(path, f"tensor {name!r} has shape {shape!r}, not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_uint, offsets))):
      raise _fail(path, f"tensor {name!r} has data_offsets {offsets!r}, not [begin, end]")
    begin, end = offsets
    expected = int(np.prod(shape, dtype=object)) * DTYPES[dtype].itemsize
    if end < begin or end - begin != expected:
      raise _fail(
        path,
        f"tensor {name!r} ({dtype}, shape {shape}) needs {expected} bytes but its "
        f"data_offsets {offsets} span {end - begin}",
      )
    infos[name] = TensorInfo(DTYPES[dtype], tuple(shape), start + begin, end - begin)
  # The tensors must tile the data region exactly, as the safetensors library requires.
  position = 0
  for name, info in sorted(infos.items(), key=lambda kv: (kv[1].begin, kv[1].nbytes)):
    if info.begin - start != position:
      what = "overlaps the previous tensor" if info.begin - start < position else "leaves a gap"
      raise _fail(path, f"tensor {name!r} at data offset {info.begin - start} {what}")
    position += info.nbytes
  if start + position != size:
    raise _fail(
      path,
      f"its tensors end at byte {start + position} but the file has {size} bytes "
      f"({'truncated' if size < start + position else 'trailing bytes'})",
    )
  return infos, metadata, size


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a .safetensors file into read-only numpy views of a memory map (no copy, no pickle).

  Args:
    path: the file.

  Returns:
    `{name: array}` in header order; bf16 tensors come back as `ml_dtypes.bfloat16`.

  Raises:
    SafetensorsError: the file is malformed (the message names it and the problem).
    FileNotFoundError: no such file.
  """
  f = SafetensorsFile(path)
  return {name: f[name] for name in f}


_DIRECT_ABOVE = 16 << 20  # Files from this size are written with O_DIRECT.


def layout(tensors: Mapping[str, Any]) -> list[str]:
  """The order `write_safetensors` writes `tensors` in (what a streaming producer follows)."""
  # Tensors whose size keeps the next one aligned come first, so each of them starts aligned.
  return sorted(tensors, key=lambda k: (_nbytes(tensors[k]) % ALIGN != 0, k))


def _nbytes(t: Any) -> int:
  return int(np.prod(t.shape, dtype=np.int64)) * np.dtype(t.dtype).itemsize


@contextlib.contextmanager
def _writer(path: pathlib.Path, size: int) -> Iterator[Any]:
  """The file to write: with O_DIRECT for large files (`direct.Writer`: 10x the page cache's
  write-back speed on this project's VM), else a plain buffered file."""
  if size < _DIRECT_ABOVE:
    with open(path, "wb") as f:
      yield f
    return
  f = direct.Writer(path)
  try:
    yield f
  finally:
    f.close()


def write_safetensors(
  path: str | os.PathLike,
  tensors: Mapping[str, Any],
  metadata: Mapping[str, str] | None = None,
  *,
  progress: Callable[[int], Any] | None = None,
) -> int:
  """Writes `tensors` as a safetensors file with `{"format": "pt"}` metadata, atomically.

  transformers refuses safetensors files whose metadata lacks a known "format". The data goes
  to a `.mergejax-tmp-` sibling first and is renamed into place once complete and fsync'ed.

  Args:
    path: the destination file.
    tensors: `{name: array}` (numpy or jax); any dtype of `DTYPES`, bf16 via `ml_dtypes`. A
      value with `shape` and `dtype` is converted (`np.asarray`) only when its turn comes, in
      `layout` order, so a producer can compute tensors as they are written; one with a
      `pieces()` method (`streaming.LazyLeaf`) gives 1-D arrays written one after the other.
    metadata: more str -> str entries for the header's `__metadata__`.
    progress: called with the byte count of each tensor once written (e.g. a tqdm bar's update).

  Returns:
    The file's size in bytes.

  Raises:
    TypeError: a tensor's dtype has no safetensors name (the message names the tensor).
  """
  arrays = {}
  for name, t in tensors.items():
    a = t if hasattr(t, "shape") and hasattr(t, "dtype") else np.asarray(t)
    if np.dtype(a.dtype) not in _NAMES:
      raise TypeError(f"Tensor {name!r} has dtype {a.dtype}, which safetensors cannot hold.")
    arrays[name] = a
  header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
  order, offset = layout(arrays), 0
  for name in order:
    a, n = arrays[name], _nbytes(arrays[name])
    header[name] = {
      "dtype": _NAMES[np.dtype(a.dtype)],
      "shape": [int(d) for d in a.shape],
      "data_offsets": [offset, offset + n],
    }
    offset += n
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-(8 + len(blob)) % ALIGN)  # Spaces pad the header, as the format allows.
  with atomic.atomic_file(path) as tmp, _writer(tmp, 8 + len(blob) + offset) as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for name in order:
      t, want = arrays[name], np.dtype(arrays[name].dtype)
      parts = t.pieces() if hasattr(t, "pieces") else [np.asarray(t)]  # One tensor at a time.
      parts = [np.ascontiguousarray(p).reshape(-1) for p in parts]
      if sum(p.nbytes for p in parts) != _nbytes(t) or any(p.dtype != want for p in parts):
        got = ", ".join(f"{p.dtype} {p.shape}" for p in parts)
        raise ValueError(f"Tensor {name!r} produced {got}, not what its header says.")
      for p in parts:
        f.write(memoryview(p.view(np.uint8)))
      if progress is not None:
        progress(_nbytes(t))
  return 8 + len(blob) + offset
