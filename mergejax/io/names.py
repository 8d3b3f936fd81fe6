"""Hugging Face (torch) tensor names and layouts <-> mergejax parameter pytrees.

One generic, invertible naming rule (no per-model tables), valid because the flax modules in
`mergejax.models` use the PyTorch module names:

  torch state dict                        mergejax pytree ("a/b/c" paths)
  encoder.layers.0.mlp.fc1.weight [o,i]   encoder/layers_0/mlp/fc1/kernel [i,o] (transposed)
  patch_embedding.weight [o,i,kh,kw]      patch_embedding/kernel [kh,kw,i,o]
  position_embedding.weight [n,d]         position_embedding/embedding [n,d] (*_embedding(s))
  pre_layrnorm.weight [d]                 pre_layrnorm/scale [d]
  *.bias                                  */bias
  class_embedding, logit_scale            class_embedding, logit_scale (bare parameters)

Integer tensors (the `position_ids` buffers some checkpoints carry) are not parameters and are
skipped; transformers rebuilds them.

>>> import numpy as np
>>> sd = {"fc1.weight": np.ones((3, 2), np.float32), "fc1.bias": np.zeros(3, np.float32)}
>>> params = state_dict_to_params(sd)
>>> params["fc1"]["kernel"].shape
(2, 3)
>>> sorted(params_to_state_dict(params))
['fc1.bias', 'fc1.weight']
"""

import re
from typing import Any

import jax
import ml_dtypes
import numpy as np

from mergejax.tree import Params

_INDEXED = re.compile(r"(.+)_(\d+)")


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
