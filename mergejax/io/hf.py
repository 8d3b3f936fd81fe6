"""Hugging Face checkpoint directories <-> mergejax parameter pytrees.

A directory as transformers writes it (config.json, model.safetensors or a shard index, or a legacy
pytorch_model.bin) is read into the nested tree of `mergejax.io.names`; a merged tree is written
back under exactly its original names, shapes and prefixes ("vision_model.", "bert."), so
`transformers.AutoModel.from_pretrained` loads the result unchanged.

Reading never executes pickled code: safetensors are parsed directly (a memory map; the flax
layout is a tree of strided views, and `jax.device_put` makes the one copy, transposing on the
way); torch `.bin` files go through `torch.load(weights_only=True)`.
"""

import json
import os
import pathlib
from typing import Any

import jax
import ml_dtypes
import numpy as np

from mergejax.io import atomic, names, safetensors
from mergejax.tree import Params


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
    return safetensors.read_safetensors(d / "model.safetensors")
  for index, reader in (
    ("model.safetensors.index.json", safetensors.read_safetensors),
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
  views = names.state_dict_to_params(read_state_dict(directory))
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
  state_dict = names.params_to_state_dict(params, dtype=dtype)
  config = dict(config)
  dtypes = {a.dtype for a in state_dict.values()}
  if len(dtypes) == 1:
    # transformers >= 5 reads "dtype", older versions "torch_dtype".
    name = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}.get(
      next(iter(dtypes)), "bfloat16"
    )
    config["dtype" if "torch_dtype" not in config else "torch_dtype"] = name
  safetensors.write_safetensors(d / "model.safetensors", state_dict)
  atomic.write_text(d / "config.json", json.dumps(config, indent=2, sort_keys=True))
  return d


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
