"""Hugging Face checkpoint directories <-> mergejax parameter pytrees.

A directory as transformers writes it (config.json, model.safetensors or a shard index with its
shards, or a legacy pytorch_model.bin, single or sharded) is read either under its torch names
(`read_state_dict`) or as the flax-layout tree of `mergejax.io.names` (`load_pretrained`). A tree
is written back as a directory transformers loads unchanged: safetensors shards of at most
`max_shard_size` plus the index, config.json, and the source checkpoint's tokenizer and other
side files (`write_dir`, `save_pretrained`).

Reading never executes pickled code: safetensors are parsed and validated by
`mergejax.io.safetensors` (memory-mapped views, nothing read until used); torch `.bin` files go
through `torch.load(weights_only=True)`. Shard indexes are checked against their shards (every
listed tensor present, nothing unlisted) and may only name files inside the directory. Every
error names the directory and, for a shard, the shard file.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_dtypes
import numpy as np

from mergejax.io import atomic, names, safetensors
from mergejax.tree import Params, is_float, num_bytes

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, BIN, BIN_INDEX)
DEFAULT_SHARD_SIZE = "5GB"  # transformers' default.
# Files of a source directory that are not copied next to new weights: weights in any format,
# config.json (rewritten), model cards (they describe the source model), mergejax's run record.
_NOT_COPIED = re.compile(
  r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf|onnx|md)|.*\.index\.json|config\.json"
  r"|run\.json|\..*"
)


# The files a checkpoint's weights and config consist of (replaced as a set by `save_pretrained`).
_WEIGHTS = re.compile(
  r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)|.*\.index\.json|config\.json"
)


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
  """Whether `path` is a directory holding Hugging Face weights (any of `WEIGHT_FILES`)."""
  p = pathlib.Path(path)
  return p.is_dir() and any((p / f).is_file() for f in WEIGHT_FILES)


# ---------------------------------------------------------------------------------- reading
def read_torch_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a torch state dict file with `torch.load(weights_only=True)` (no code runs).

  Args:
    path: a pytorch_model.bin or other `torch.save` file, zip or legacy format; a dict wrapped
      as `{"state_dict": ...}` (training checkpoints) is unwrapped.

  Returns:
    `{name: numpy array}`; memory-mapped for zip files, bf16 as `ml_dtypes.bfloat16`.

  Raises:
    ValueError: naming the file, if it is not a state dict of tensors.
  """
  path = pathlib.Path(path)
  try:
    import torch  # noqa: PLC0415 (optional dependency, only for legacy .bin checkpoints)
  except ImportError as e:
    raise ImportError(f"{path} is a torch pickle; install torch to read it.") from e
  # weights_only=True: the unpickler only rebuilds tensors and containers, never runs code.
  # Memory-mapping needs the zip format (torch >= 1.6); older files are read into memory.
  try:
    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
  except Exception as e:  # noqa: BLE001 (torch raises many types; all mean "cannot read it")
    raise ValueError(
      f"{path}: torch.load(weights_only=True) cannot read it ({type(e).__name__}: "
      f"{str(e).splitlines()[0][:200]}). mergejax never unpickles arbitrary objects; convert "
      "the checkpoint to safetensors where it was made."
    ) from None
  if isinstance(sd, dict) and not all(isinstance(v, torch.Tensor) for v in sd.values()):
    if isinstance(sd.get("state_dict"), dict):
      sd = sd["state_dict"]  # Training checkpoints wrap the weights: {"state_dict": ..., ...}.
  if not isinstance(sd, dict):
    raise ValueError(f"{path}: holds a {type(sd).__name__}, not a state dict of tensors.")
  out = {}
  for k, t in sd.items():
    if not isinstance(t, torch.Tensor):
      raise ValueError(
        f"{path}: entry {k!r} is a {type(t).__name__}, not a tensor; expected a state dict "
        "(optionally wrapped as {'state_dict': ...})."
      )
    t = t.detach()
    if t.dtype == torch.bfloat16:  # numpy has no bf16: reinterpret the bits.
      out[k] = t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
      try:
        out[k] = t.numpy()
      except TypeError as e:
        raise ValueError(f"{path}: tensor {k!r} has dtype {t.dtype}, unknown to numpy.") from e
  return out


def _shard_path(directory: pathlib.Path, index: pathlib.Path, name: Any) -> pathlib.Path:
  """The shard `name` of `index`, which must be a relative path inside `directory`."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"{index}: shard name {name!r} is not a file name.")
  rel = pathlib.PurePosixPath(name)
  # Lexical check: symlinks inside the directory (the Hugging Face cache's layout) stay allowed.
  if rel.is_absolute() or ".." in rel.parts or "\\" in name:
    raise ValueError(f"{index}: shard {name!r} lies outside {directory}; refusing to read it.")
  path = directory / rel
  if not path.is_file():
    raise FileNotFoundError(f"{index}: shard {name!r} is missing from {directory}.")
  return path


def _read_sharded(
  directory: pathlib.Path, index: pathlib.Path, reader: Callable[[pathlib.Path], dict]
) -> dict[str, np.ndarray]:
  try:
    weight_map = json.loads(index.read_text())["weight_map"]
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{index}: not a shard index with a weight_map ({e}).") from None
  if not isinstance(weight_map, dict) or not weight_map:
    raise ValueError(f"{index}: weight_map is not a non-empty map of tensor -> shard.")
  by_shard: dict[str, set[str]] = {}
  for tensor, shard in weight_map.items():
    by_shard.setdefault(shard, set()).add(tensor)
  out = {}
  for shard, listed in by_shard.items():
    path = _shard_path(directory, index, shard)
    try:
      tensors = reader(path)
    except safetensors.SafetensorsError as e:
      raise safetensors.SafetensorsError(f"{e} (shard of {index})") from None
    missing, unlisted = sorted(listed - set(tensors)), sorted(set(tensors) - listed)
    if missing or unlisted:
      raise ValueError(
        f"{index}: shard {shard!r} does not match the index: tensors listed but absent "
        f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, present but not listed "
        f"{unlisted[:5]}{' ...' if len(unlisted) > 5 else ''}."
      )
    out.update(tensors)
  return out


def read_state_dict(directory: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads the weights of a Hugging Face checkpoint directory, torch names unchanged.

  Looks for, in order: model.safetensors, model.safetensors.index.json (sharded),
  pytorch_model.bin, pytorch_model.bin.index.json.

  Args:
    directory: a `save_pretrained` directory.

  Returns:
    `{torch name: numpy array}` (read-only views of memory maps for safetensors and zip .bin).

  Raises:
    FileNotFoundError: no weights file in `directory`, or a shard is missing.
    ValueError: a malformed file or index (the message names the file and the shard).
  """
  d = pathlib.Path(directory)
  if (d / SAFETENSORS).is_file():
    return safetensors.read_safetensors(d / SAFETENSORS)
  if (d / SAFETENSORS_INDEX).is_file():
    return _read_sharded(d, d / SAFETENSORS_INDEX, safetensors.read_safetensors)
  if (d / BIN).is_file():
    return read_torch_file(d / BIN)
  if (d / BIN_INDEX).is_file():
    return _read_sharded(d, d / BIN_INDEX, read_torch_file)
  raise FileNotFoundError(
    f"No {', '.join(WEIGHT_FILES)} in {d} (contents: "
    f"{sorted(p.name for p in d.iterdir())[:10] if d.is_dir() else 'not a directory'})."
  )


def read_config(directory: str | os.PathLike) -> dict:
  """Returns the parsed config.json of a checkpoint directory."""
  path = pathlib.Path(directory) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"No config.json in {directory}.")
  try:
    return json.loads(path.read_text())
  except ValueError as e:
    raise ValueError(f"{path}: not valid JSON ({e}).") from None


def load_pretrained(
  directory: str | os.PathLike,
  *,
  dtype: Any = np.float32,
  lazy: bool = False,
  buffers: bool = False,
) -> tuple[Params, dict]:
  """Loads a Hugging Face checkpoint directory as a mergejax pytree in flax layout.

  Args:
    directory: holds config.json and model.safetensors (or a shard index, or pytorch_model.bin).
    dtype: floating leaves are cast to this (None keeps the stored dtype).
    lazy: return numpy views of the memory-mapped file (nothing is read until used; transposed
      kernels are strided views) instead of device arrays.
    buffers: also return the non-floating tensors (e.g. `position_ids`), as numpy arrays (jax
      would narrow int64). They are not parameters: flax modules do not take them and
      transformers rebuilds them, so they are left out by default.

  Returns:
    `(params, config)`: the nested tree of the file, prefixes kept ("vision_model", "bert",
    "classifier", ...), and the config.json dict.
  """
  config = read_config(directory)
  state_dict = read_state_dict(directory)
  if not buffers:
    state_dict = {k: v for k, v in state_dict.items() if is_float(v)}
  views = names.state_dict_to_params(state_dict)
  cast = lambda a: a if dtype is None or not is_float(a) or a.dtype == dtype else a.astype(dtype)
  if lazy:
    return jax.tree.map(cast, views), config
  # device_put straight from the strided memory-map views: XLA's transfer does the transposes
  # (~3x faster than numpy's transposing copy on CPU) and it is the only copy made. Integer
  # buffers stay numpy.
  params = jax.tree.map(lambda a: cast(jax.device_put(a)) if is_float(a) else a, views)
  return params, config


# ---------------------------------------------------------------------------------- writing
def parse_size(size: int | str) -> int:
  """Parses a shard size: bytes, or a string such as "5GB", "500MB", "2GiB" (as transformers).

  >>> parse_size("5GB"), parse_size("1KiB"), parse_size(100)
  (5000000000, 1024, 100)
  """
  if isinstance(size, int) and not isinstance(size, bool) and size > 0:
    return size
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
  if not match:
    raise ValueError(f"Shard size {size!r}: expected bytes or e.g. '5GB', '500MB', '2GiB'.")
  unit = (match[2] or "B").upper()
  base = 1024 if "I" in unit else 1000
  power = "BKMGT".index(unit[0])
  value = int(float(match[1]) * base**power)
  if value <= 0:
    raise ValueError(f"Shard size {size!r} must be positive.")
  return value


def shard(tensors: Mapping[str, Any], max_bytes: int) -> list[list[str]]:
  """Groups tensor names, in sorted order, into shards of at most `max_bytes` (a larger tensor
  gets a shard of its own), as transformers does."""
  shards: list[list[str]] = [[]]
  size = 0
  for name in sorted(tensors):
    n = num_bytes(tensors[name])
    if shards[-1] and size + n > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += n
  return shards


def write_order(tensors: Mapping[str, Any], max_shard_size: int | str) -> list[str]:
  """The order `write_dir` writes `tensors` in: shard by shard, each in `safetensors.layout`."""
  groups = shard(tensors, parse_size(max_shard_size))
  return [n for g in groups for n in safetensors.layout({k: tensors[k] for k in g})]


def _torch_dtype_name(dtypes: set[np.dtype]) -> str | None:
  known = {
    np.dtype(np.float32): "float32",
    np.dtype(np.float16): "float16",
    np.dtype(ml_dtypes.bfloat16): "bfloat16",
    np.dtype(np.float64): "float64",
  }
  return known.get(next(iter(dtypes))) if len(dtypes) == 1 else None


def write_dir(
  directory: str | os.PathLike,
  state_dict: Mapping[str, Any],
  config: Mapping[str, Any] | None,
  *,
  source: str | os.PathLike | None = None,
  max_shard_size: int | str = DEFAULT_SHARD_SIZE,
  progress: Callable[[int], Any] | None = None,
) -> int:
  """Writes a checkpoint directory: weights (sharded above `max_shard_size`), config, side files.

  One shard is written as model.safetensors; several as model-0000i-of-0000n.safetensors plus
  model.safetensors.index.json. Each file is written atomically, but the directory as a whole is
  not: write into a fresh directory and rename it (as `save_pretrained` and `mergejax.run` do).

  Args:
    directory: created if missing.
    state_dict: `{torch name: array}`.
    config: the config.json dict (its "dtype" / "torch_dtype" follows the floating tensors);
      None writes no config.json.
    source: a checkpoint directory whose tokenizer, processor and generation files are copied
      (everything but weights, config.json, model cards, run.json and hidden files).
    max_shard_size: bytes per shard at most (int, or a string such as "5GB").
    progress: called with each tensor's byte count once written.

  Returns:
    Bytes written.
  """
  d = pathlib.Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  groups = shard(state_dict, parse_size(max_shard_size))
  written = 0
  if len(groups) == 1:
    written += safetensors.write_safetensors(d / SAFETENSORS, state_dict, progress=progress)
  else:
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
      name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
      part = {k: state_dict[k] for k in group}
      written += safetensors.write_safetensors(d / name, part, progress=progress)
      weight_map.update(dict.fromkeys(group, name))
      total += num_bytes(part)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    text = json.dumps(index, indent=2)
    atomic.write_text(d / SAFETENSORS_INDEX, text)
    written += len(text)
  if config is not None:
    config = dict(config)
    name = _torch_dtype_name({np.dtype(a.dtype) for a in state_dict.values() if is_float(a)})
    if name:  # transformers >= 5 reads "dtype", older versions "torch_dtype".
      config["dtype" if "torch_dtype" not in config else "torch_dtype"] = name
    text = json.dumps(config, indent=2, sort_keys=True)
    atomic.write_text(d / "config.json", text)
    written += len(text)
  if source is not None:
    for f in sorted(pathlib.Path(source).iterdir()):
      if f.is_file() and not _NOT_COPIED.fullmatch(f.name):
        with atomic.atomic_file(d / f.name) as tmp:
          shutil.copyfile(f, tmp)
        written += f.stat().st_size
  return written


def save_pretrained(
  directory: str | os.PathLike,
  params: Params,
  config: dict,
  *,
  dtype: Any = None,
  max_shard_size: int | str = DEFAULT_SHARD_SIZE,
  source: str | os.PathLike | None = None,
) -> pathlib.Path:
  """Writes a flax-layout tree as a transformers checkpoint directory, atomically as a whole.

  The new directory is built under a temporary name (the existing directory's other files, such
  as a tokenizer, hard-linked into it) and swapped in: an earlier checkpoint at `directory` is
  replaced only once the new one is complete, and its weight files, stale shards included, go.

  Args:
    directory: the checkpoint directory (created if missing; files other than weights and
      config.json are kept).
    params: a tree laid out as `load_pretrained` returns it (same prefixes).
    config: the config.json dict to write (usually the one loaded with the source checkpoint).
    dtype: cast floating tensors before writing (None keeps their dtype).
    max_shard_size: bytes per safetensors shard at most (default 5GB, as transformers).
    source: a checkpoint directory whose tokenizer and other side files are copied.

  Returns:
    The directory.
  """
  d = pathlib.Path(directory)
  state_dict = names.params_to_state_dict(params, dtype=dtype)
  with atomic.atomic_dir(d) as tmp:
    tmp.mkdir()
    for f in sorted(d.iterdir()) if d.is_dir() else ():
      if not (_WEIGHTS.fullmatch(f.name) or f.name.startswith(atomic.TMP_PREFIX)):
        _link_or_copy(f, tmp / f.name)
    write_dir(tmp, state_dict, config, source=source, max_shard_size=max_shard_size)
  return d


def _link_or_copy(src: pathlib.Path, dst: pathlib.Path) -> None:
  if src.is_dir():
    shutil.copytree(src, dst, copy_function=_link_or_copy, symlinks=True)
    return
  try:
    os.link(src, dst)  # Same filesystem (a sibling): no data copied.
  except OSError:
    shutil.copy2(src, dst)
