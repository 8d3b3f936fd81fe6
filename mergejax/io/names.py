"""Hugging Face (torch) tensor names and layouts <-> mergejax parameter pytrees.

One generic naming rule (no per-model tables), which the flax modules in `mergejax.models` follow
because they use the PyTorch module names:

  torch state dict                        mergejax pytree ("a/b/c" paths)
  encoder.layers.0.mlp.fc1.weight [o,i]   encoder/layers_0/mlp/fc1/kernel [i,o] (transposed)
  patch_embedding.weight [o,i,kh,kw]      patch_embedding/kernel [kh,kw,i,o]
  position_embedding.weight [n,d]         position_embedding/embedding [n,d] (*_embedding(s))
  pre_layrnorm.weight [d]                 pre_layrnorm/scale [d]
  conv1d.weight [o,i,k] (other ranks)     conv1d/weight [o,i,k] (unchanged)
  *.bias, buffers (position_ids)          */bias, */position_ids (unchanged)

The rule is invertible by construction: `params_to_state_dict` undoes it, and the few torch names
the plain rule would not give back are escaped with a trailing "_" on the way in:
  * a name ending in "_<digits>" (GPT-2's `ln_1`, T5's `wi_0`) would read as a list index
    ("ln.1"), so it becomes `ln_1_`;
  * a name spelled like a renamed leaf (`kernel`, `embedding`, `scale`) would read as a renamed
    "weight", so it becomes `scale_`;
  * and a name that already ends in such an escape gets one more "_".
`state_dict_to_params` checks that every name maps back to itself, so a checkpoint either
round-trips exactly or fails to load with the offending name.

>>> import numpy as np
>>> sd = {"h.0.ln_1.weight": np.ones(3, np.float32), "h.0.fc.weight": np.ones((3, 2), np.float32)}
>>> params = state_dict_to_params(sd)
>>> sorted(params["h_0"]), params["h_0"]["fc"]["kernel"].shape
(['fc', 'ln_1_'], (2, 3))
>>> sorted(params_to_state_dict(params))
['h.0.fc.weight', 'h.0.ln_1.weight']
"""

from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np

from mergejax.tree import Params, is_float

_RENAMED = ("kernel", "embedding", "scale")  # Leaf names that stand for a torch "weight".
# Torch names the plain rule would misread, with any escapes they already carry.
_NEEDS_ESCAPE = re.compile(r".*_\d+_*|(kernel|embedding|scale)_*")
_ESCAPED = re.compile(r".*_\d+_+|(kernel|embedding|scale)_+")
_INDEX = re.compile(r"(.+)_(\d+)")


def _is_embedding(module: str) -> bool:
  return module.endswith("embedding") or module.endswith("embeddings")


def _to_path(name: str) -> list[str]:
  """Torch name -> flax path components (before the leaf rename)."""
  parts: list[str] = []
  for p in name.split("."):
    if p.isdigit() and parts:
      parts[-1] = f"{parts[-1]}_{p}"  # "layers.0" -> "layers_0": one flax module per layer.
    else:
      parts.append(f"{p}_" if _NEEDS_ESCAPE.fullmatch(p) else p)
  return parts


def _to_name(parts: list[str]) -> str:
  """Flax path components (leaf already renamed back) -> torch name."""
  out = []
  for part in parts:
    indices = []
    while match := _INDEX.fullmatch(part):
      part, index = match[1], match[2]
      indices.append(index)
    if _ESCAPED.fullmatch(part):
      part = part[:-1]
    out.extend([part, *reversed(indices)])
  return ".".join(out)


def state_dict_to_params(state_dict: dict[str, Any], *, dtype: Any = None) -> Params:
  """Maps a torch state dict to a nested mergejax parameter dict (see the module docstring).

  Args:
    state_dict: `{torch name: array}`.
    dtype: cast floating tensors to this dtype (copies); None keeps the stored dtype and copies
      nothing.

  Returns:
    Nested dict of numpy arrays in flax layout, every tensor included (integer buffers too).
    Without a cast these are views of the inputs (transposed kernels are strided views), so
    mapping a memory-mapped file reads nothing yet.

  Raises:
    ValueError: a name that would not map back to itself (never for names torch can produce).
  """
  params: dict = {}
  for key, a in state_dict.items():
    a = np.asarray(a)
    *modules, leaf = _to_path(key)
    if leaf == "weight" and modules and is_float(a):
      if a.ndim == 4:  # Conv [out, in, kh, kw] -> [kh, kw, in, out].
        leaf, a = "kernel", a.transpose(2, 3, 1, 0)
      elif a.ndim == 2 and _is_embedding(modules[-1]):
        leaf = "embedding"
      elif a.ndim == 2:  # Linear [out, in] -> Dense [in, out].
        leaf, a = "kernel", a.T
      elif a.ndim == 1:
        leaf = "scale"  # LayerNorm.
    back = _to_name([*modules, "weight" if leaf in _RENAMED else leaf])
    if back != key:
      raise ValueError(f"Tensor name {key!r} would be written back as {back!r}.")
    if dtype is not None and is_float(a) and a.dtype != dtype:
      a = a.astype(dtype)
    node = params
    for m in modules:
      node = node.setdefault(m, {})
      if not isinstance(node, dict):
        raise ValueError(f"Tensor name {key!r} passes through another tensor's name.")
    if leaf in node:
      raise ValueError(f"Tensor name {key!r} collides with another tensor's or module's name.")
    node[leaf] = a
  return params


def params_to_state_dict(params: Params, *, dtype: Any = None) -> dict[str, np.ndarray]:
  """Inverse of `state_dict_to_params`: torch names and layouts.

  Args:
    params: nested dict of arrays (numpy or jax) in flax layout.
    dtype: cast every floating tensor to this dtype (e.g. `ml_dtypes.bfloat16`); None keeps
      each dtype. Integer and bool tensors are never cast.

  Returns:
    `{torch name: numpy array}` (transposes are views; the writer makes them contiguous).
  """
  out = {}
  for path, a in jax.tree.flatten_with_path(params)[0]:
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    *modules, leaf = names
    a = np.asarray(jax.device_get(a))
    if leaf == "kernel":
      if a.ndim not in (2, 4):
        raise ValueError(f"Leaf {'/'.join(names)!r}: no torch layout for a rank-{a.ndim} kernel.")
      a = a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T
    if leaf in _RENAMED:
      leaf = "weight"
    if dtype is not None and is_float(a):
      a = a.astype(dtype)
    out[_to_name([*modules, leaf])] = a
  return out
