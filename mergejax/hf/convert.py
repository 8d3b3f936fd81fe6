"""Hugging Face checkpoint directories <-> mergejax parameter pytrees.

One generic, invertible naming rule (no per-model tables), valid because the flax modules in
`mergejax.hf` use the PyTorch module names:

  torch state dict                        mergejax pytree ("a/b/c" paths)
  encoder.layers.0.mlp.fc1.weight [o,i]   encoder/layers_0/mlp/fc1/kernel [i,o] (transposed)
  patch_embedding.weight [o,i,kh,kw]      patch_embedding/kernel [kh,kw,i,o]
  position_embedding.weight [n,d]         position_embedding/embedding [n,d] (*_embedding(s))
  pre_layrnorm.weight [d]                 pre_layrnorm/scale [d]
  *.bias                                  */bias
  class_embedding, logit_scale            class_embedding, logit_scale (bare parameters)

Integer tensors (the `position_ids` buffers some checkpoints carry) are not parameters and are
skipped; transformers rebuilds them. Exporting applies the inverse rule, so a tree loaded from a
checkpoint is written back under exactly its original names, shapes and prefixes ("vision_model.",
"bert."), and `transformers.AutoModel.from_pretrained` loads the result unchanged.

Reading never executes pickled code: safetensors are parsed directly (a memory map; the flax
layout is a tree of strided views, and `jax.device_put` makes the one copy, transposing on the
way); torch `.bin` files go through `torch.load(weights_only=True)`.

>>> import numpy as np
>>> sd = {"fc1.weight": np.ones((3, 2), np.float32), "fc1.bias": np.zeros(3, np.float32)}
>>> params = state_dict_to_params(sd)
>>> params["fc1"]["kernel"].shape
(2, 3)
>>> sorted(params_to_state_dict(params))
['fc1.bias', 'fc1.weight']
"""

import json
import os
import pathlib
import re
import tempfile
from typing import Any

import jax
import ml_dtypes
import numpy as np

Params = Any

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
_INDEXED = re.compile(r"(.+)_(\d+)")


# ---------------------------------------------------------------------------------------------
# safetensors files
# ---------------------------------------------------------------------------------------------


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


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray]) -> None:
  """Writes `tensors` as a safetensors file with `{"format": "pt"}` metadata, atomically.

  transformers refuses safetensors files whose metadata lacks a known "format".

  Args:
    path: the destination file.
    tensors: `{name: array}`; any numpy dtype safetensors knows, bf16 via `ml_dtypes`.
  """
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
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
  path = pathlib.Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp_" + path.name)
  with os.fdopen(fd, "wb") as f:
    f.write(np.uint64(len(blob)).astype("<u8").tobytes())
    f.write(blob)
    for a in arrays:
      f.write(memoryview(a.reshape(-1).view(np.uint8)))
  os.replace(tmp, path)


def _read_torch_bin(path: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    import torch  # noqa: PLC0415 (optional dependency, only for legacy .bin checkpoints)
  except ImportError as e:
    raise ImportError(f"{path} is a torch pickle; install torch to read it.") from e
  # weights_only=True: the unpickler only rebuilds tensors and containers, never runs code.
  sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
  out = {}
  for k, t in sd.items():
    t = t.detach()
    if t.dtype == torch.bfloat16:  # numpy has no bf16: reinterpret the bits.
      out[k] = t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
      out[k] = t.numpy()
  return out


def read_state_dict(directory: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads the weights of a Hugging Face checkpoint directory, torch names unchanged.

  Looks for, in order: model.safetensors, model.safetensors.index.json (sharded),
  pytorch_model.bin, pytorch_model.bin.index.json.

  Args:
    directory: a `save_pretrained` directory.

  Returns:
    `{torch name: numpy array}` (read-only views for safetensors).

  Raises:
    FileNotFoundError: no weights file in `directory`.
  """
  d = pathlib.Path(directory)
  if (d / "model.safetensors").exists():
    return read_safetensors(d / "model.safetensors")
  for index, reader in (
    ("model.safetensors.index.json", read_safetensors),
    ("pytorch_model.bin.index.json", _read_torch_bin),
  ):
    if (d / index).exists():
      files = sorted(set(json.loads((d / index).read_text())["weight_map"].values()))
      out = {}
      for f in files:
        out.update(reader(d / f))
      return out
  if (d / "pytorch_model.bin").exists():
    return _read_torch_bin(d / "pytorch_model.bin")
  raise FileNotFoundError(
    f"No model.safetensors, pytorch_model.bin or shard index in {d} (contents: "
    f"{sorted(p.name for p in d.iterdir()) if d.is_dir() else 'not a directory'})."
  )


def read_config(directory: str | os.PathLike) -> dict:
  """Returns the parsed config.json of a checkpoint directory."""
  path = pathlib.Path(directory) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"No config.json in {directory}.")
  return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------
# Names and layouts
# ---------------------------------------------------------------------------------------------


def _is_embedding(module: str) -> bool:
  return module.endswith("embedding") or module.endswith("embeddings")


def state_dict_to_params(state_dict: dict[str, np.ndarray], *, dtype: Any = None) -> Params:
  """Maps a torch state dict to a nested mergejax parameter dict (see the module docstring).

  Args:
    state_dict: `{torch name: array}`.
    dtype: cast floating tensors to this dtype (copies); None keeps the stored dtype and copies
      nothing.

  Returns:
    Nested dict of numpy arrays in flax layout. Without a cast these are views of the inputs
    (transposed kernels are strided views), so mapping a memory-mapped file reads nothing yet.
  """
  params: dict = {}
  for key, a in state_dict.items():
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.floating) and a.dtype != ml_dtypes.bfloat16:
      continue  # Buffers such as position_ids.
    parts = []
    for p in key.split("."):
      if p.isdigit() and parts:
        parts[-1] = f"{parts[-1]}_{p}"  # "layers.0" -> "layers_0": one flax module per layer.
      else:
        parts.append(p)
    *modules, leaf = parts
    if leaf == "weight" and modules:
      if a.ndim == 4:  # Conv [out, in, kh, kw] -> [kh, kw, in, out].
        leaf, a = "kernel", a.transpose(2, 3, 1, 0)
      elif a.ndim == 2 and _is_embedding(modules[-1]):
        leaf = "embedding"
      elif a.ndim == 2:  # Linear [out, in] -> Dense [in, out].
        leaf, a = "kernel", a.T
      elif a.ndim == 1:
        leaf = "scale"  # LayerNorm.
      else:
        raise ValueError(f"Don't know the flax layout of {key} with shape {a.shape}.")
    if dtype is not None and a.dtype != dtype:
      a = a.astype(dtype)
    node = params
    for m in modules:
      node = node.setdefault(m, {})
    node[leaf] = a
  return params


def params_to_state_dict(params: Params, *, dtype: Any = None) -> dict[str, np.ndarray]:
  """Inverse of `state_dict_to_params`: torch names and layouts.

  Args:
    params: nested dict of arrays (numpy or jax) in flax layout.
    dtype: cast every tensor to this dtype (e.g. `ml_dtypes.bfloat16`); None keeps each dtype.

  Returns:
    `{torch name: contiguous numpy array}`.
  """
  out = {}
  for path, a in jax.tree.flatten_with_path(params)[0]:
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    *modules, leaf = names
    a = np.asarray(jax.device_get(a))
    if leaf == "kernel":
      leaf, a = "weight", (a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T)
    elif leaf in ("embedding", "scale"):
      leaf = "weight"
    parts = []
    for m in modules:
      match = _INDEXED.fullmatch(m)
      parts.append(f"{match[1]}.{match[2]}" if match else m)
    a = np.asarray(a if dtype is None else a.astype(dtype), order="C")
    out[".".join([*parts, leaf])] = a
  return out


# ---------------------------------------------------------------------------------------------
# Directories
# ---------------------------------------------------------------------------------------------


def load_pretrained(
  directory: str | os.PathLike, *, dtype: Any = np.float32, lazy: bool = False
) -> tuple[Params, dict]:
  """Loads a Hugging Face checkpoint directory as a mergejax pytree.

  Args:
    directory: holds config.json and model.safetensors (or a shard index, or pytorch_model.bin).
    dtype: floating leaves are cast to this (None keeps the stored dtype).
    lazy: return numpy views of the memory-mapped file (nothing is read until used; transposed
      kernels are strided views) instead of device arrays.

  Returns:
    `(params, config)`: the full nested tree of the file, prefixes kept ("vision_model", "bert",
    "classifier", ...), and the config.json dict.
  """
  config = read_config(directory)
  views = state_dict_to_params(read_state_dict(directory))
  if lazy:
    return (views if dtype is None else jax.tree.map(lambda a: _cast(a, dtype), views)), config
  # device_put straight from the strided memory-map views: XLA's transfer does the transposes
  # (~3x faster than numpy's transposing copy on CPU) and it is the only copy made.
  params = jax.device_put(views)
  if dtype is not None:
    params = jax.tree.map(lambda a: _cast(a, dtype), params)
  return params, config


def _cast(a, dtype):
  return a if a.dtype == dtype else a.astype(dtype)


def save_pretrained(
  directory: str | os.PathLike, params: Params, config: dict, *, dtype: Any = None
) -> pathlib.Path:
  """Writes `params` as a transformers checkpoint: config.json + model.safetensors.

  Args:
    directory: created if missing; existing files of the same names are replaced atomically.
    params: a tree laid out as `load_pretrained` returns it (same prefixes).
    config: the config.json dict to write (usually the one loaded with the source checkpoint).
    dtype: cast tensors before writing (None keeps their dtype).

  Returns:
    The directory.
  """
  d = pathlib.Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  state_dict = params_to_state_dict(params, dtype=dtype)
  config = dict(config)
  dtypes = {a.dtype for a in state_dict.values()}
  if len(dtypes) == 1:
    # transformers >= 5 reads "dtype", older versions "torch_dtype".
    name = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}.get(
      next(iter(dtypes)), "bfloat16"
    )
    config["dtype" if "torch_dtype" not in config else "torch_dtype"] = name
  write_safetensors(d / "model.safetensors", state_dict)
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_config")
  with os.fdopen(fd, "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  os.replace(tmp, d / "config.json")
  return d


def load_flax_model(directory: str | os.PathLike, *, dtype: Any = None) -> tuple[Any, Params]:
  """Loads a CLIP or BERT checkpoint directory as a ready-to-apply flax module and its params.

  Args:
    directory: checkpoint directory; config.json's `model_type` picks the module
      ("clip", "clip_vision_model", "clip_text_model", "bert").
    dtype: computation dtype of the module (None: fp32); parameters are loaded in fp32.

  Returns:
    `(module, params)`, to be used as `module.apply({"params": params}, ...)`. For files holding
    more than the encoder (e.g. BertForSequenceClassification) `params` is the encoder subtree.
  """
  import jax.numpy as jnp  # noqa: PLC0415

  from mergejax.hf import bert, clip  # noqa: PLC0415 (models sit above the name mapping)

  dtype = dtype or jnp.float32
  params, config = load_pretrained(directory)
  kind = config.get("model_type")
  if kind == "clip":
    return clip.CLIPModel(clip.CLIPConfig.from_dict(config), dtype), params
  if kind == "clip_vision_model":
    cfg = clip.CLIPVisionConfig.from_dict(config)
    return clip.CLIPVisionTransformer(cfg, dtype), clip.vision_tower(params)
  if kind == "clip_text_model":
    cfg = clip.CLIPTextConfig.from_dict(config)
    return clip.CLIPTextTransformer(cfg, dtype), params.get("text_model", params)
  if kind == "bert":
    tree = params.get("bert", params)
    module = bert.BertModel(bert.BertConfig.from_dict(config), "pooler" in tree, dtype)
    return module, tree
  raise ValueError(f"Unsupported model_type {kind!r} in {directory}.")


def load_tokenizer(directory: str | os.PathLike, *, max_length: int | None = None) -> Any:
  """Loads the fast tokenizer (tokenizer.json) of a checkpoint directory with the `tokenizers` lib.

  Args:
    directory: holds tokenizer.json (transformers' fast-tokenizer file; special tokens and the
      post-processor that adds [CLS]/[SEP] or <|startoftext|>/<|endoftext|> are part of it).
    max_length: truncate to this many tokens, special tokens included (e.g. CLIP's 77).

  Returns:
    A `tokenizers.Tokenizer` that pads each batch to its longest sequence.
  """
  from tokenizers import Tokenizer  # noqa: PLC0415 (optional dependency)

  path = pathlib.Path(directory) / "tokenizer.json"
  if not path.exists():
    raise FileNotFoundError(f"No tokenizer.json in {directory}.")
  tok = Tokenizer.from_file(str(path))
  pad = tok.padding or {}
  tok.no_truncation()
  if max_length:
    tok.enable_truncation(max_length)
  # Pad to the batch's longest row, whatever fixed length the file asks for.
  tok.enable_padding(pad_id=pad.get("pad_id", 0), pad_token=pad.get("pad_token", "[PAD]"))
  return tok


def encode(tokenizer: Any, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """Tokenizes a batch of texts.

  Args:
    tokenizer: from `load_tokenizer`.
    texts: the strings.

  Returns:
    `(input_ids, attention_mask)`, both int32 `[len(texts), longest]`.
  """
  encodings = tokenizer.encode_batch(texts)
  ids = np.asarray([e.ids for e in encodings], np.int32)
  mask = np.asarray([e.attention_mask for e in encodings], np.int32)
  return ids, mask
