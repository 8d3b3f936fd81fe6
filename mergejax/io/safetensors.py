"""safetensors files: the project's one reader and one writer (memory-mapped, no pickle).

The format: 8 bytes little-endian header length N, N bytes of JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the raw
tensor bytes. Reading returns read-only numpy views of a memory map, so nothing is read until used.
"""

import json
import os
from typing import Any

import ml_dtypes
import numpy as np

from mergejax.io import atomic

_ST_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a .safetensors file into read-only numpy views of a memory map (no copy, no pickle).

  Args:
    path: the file.

  Returns:
    `{name: array}` in file order; bf16 tensors come back as `ml_dtypes.bfloat16`.
  """
  mm = np.memmap(path, dtype=np.uint8, mode="r")
  n = int(np.frombuffer(mm[:8].tobytes(), "<u8")[0])
  header = json.loads(mm[8 : 8 + n].tobytes())
  header.pop("__metadata__", None)
  start = 8 + n
  out = {}
  for name, info in header.items():
    begin, end = info["data_offsets"]
    dtype = np.dtype(_ST_DTYPES[info["dtype"]])
    out[name] = mm[start + begin : start + end].view(dtype).reshape(info["shape"])
  return out


def write_safetensors(
  path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
) -> None:
  """Writes `tensors` as a safetensors file with `{"format": "pt"}` metadata, atomically.

  transformers refuses safetensors files whose metadata lacks a known "format".

  Args:
    path: the destination file.
    tensors: `{name: array}`; any numpy dtype safetensors knows, bf16 via `ml_dtypes`.
    metadata: more str -> str entries for the header's `__metadata__`.
  """
  header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
  arrays, offset = [], 0
  for name in sorted(tensors):
    a = np.asarray(tensors[name], order="C")  # Not ascontiguousarray: it makes scalars 1-d.
    header[name] = {
      "dtype": _ST_NAMES[a.dtype],
      "shape": list(a.shape),
      "data_offsets": [offset, offset + a.nbytes],
    }
    arrays.append(a)
    offset += a.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # The format pads the header to 8-byte alignment with spaces.
  with atomic.atomic_file(path) as tmp, open(tmp, "wb") as f:
    f.write(np.uint64(len(blob)).astype("<u8").tobytes())
    f.write(blob)
    for a in arrays:
      f.write(memoryview(a.reshape(-1).view(np.uint8)))
