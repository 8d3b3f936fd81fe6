"""Layer-wise learning-rate decay (BEiT, ELECTRA): lower layers learn more slowly.

A leaf of layer l of a model with L blocks has its update scaled by `decay ** (L + 1 - l)`; the
layers are read from the leaf paths (`layer_indices`), so any flax model whose blocks are named
`block_<i>` (or `layers_<i>`, ...) works without cooperation.
"""

import re

import jax
import jax.numpy as jnp
import optax

from mergejax.tree import Params

# A transformer / residual block's index in a leaf path ("block_2/mlp/kernel", "layers_0/...").
_BLOCK = re.compile(r"(?:^|/)(?:block|blocks|layer|layers|encoderblock)_(\d+)(?:/|$)")
# Leaves below the first block: the input embedding, class token, position embedding, stem.
_EMBEDDING = re.compile(r"embed|(?:^|/)(?:cls|pos|stem)(?:_|/|$)")


def layer_indices(params: Params) -> tuple[Params, int]:
  """Each leaf's layer for layer-wise learning-rate decay, from its path.

  Leaves of block i (a path component `block_i`, `blocks_i`, `layer_i`, `layers_i` or
  `encoderblock_i`) are layer i + 1; the embedding, class token, position embedding and stem
  (paths matching "embed", "cls", "pos", "stem") layer 0; every other leaf (final norms, heads)
  the top, L + 1.

  Args:
    params: the trainable parameters.

  Returns:
    (a pytree of ints like `params`, L = the number of blocks).

  Raises:
    ValueError: no leaf path names a block.
  """
  paths = {jax.tree_util.keystr(kp, simple=True, separator="/") for kp, _ in _leaves(params)}
  blocks = [int(m.group(1)) for p in paths if (m := _BLOCK.search(p))]
  if not blocks:
    raise ValueError(
      f"layer_decay needs leaf paths that name their block (block_<i>, layers_<i>, ...); "
      f"none of {sorted(paths)[:5]}... does. Use layer_decay=1.0 for this model."
    )
  num_layers = max(blocks) + 1

  def layer(kp, _):
    path = jax.tree_util.keystr(kp, simple=True, separator="/")
    if m := _BLOCK.search(path):
      return int(m.group(1)) + 1
    return 0 if _EMBEDDING.search(path) else num_layers + 1

  return jax.tree_util.tree_map_with_path(layer, params), num_layers


def _leaves(params):
  return jax.tree_util.tree_flatten_with_path(params)[0]


def scale_by_layer_decay(layer_decay: float) -> optax.GradientTransformation:
  """Scales each leaf's update by `layer_decay ** (L + 1 - layer)` (see `layer_indices`).

  Args:
    layer_decay: the decay per layer, in (0, 1].

  Returns:
    A stateless optax transformation (the scales follow from the updates' paths).
  """
  if not 0.0 < layer_decay <= 1.0:
    raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay!r}.")

  def update_fn(updates, state, params=None):
    del params
    layers, num_layers = layer_indices(updates)
    scaled = jax.tree.map(
      lambda u, layer: u * jnp.asarray(layer_decay ** (num_layers + 1 - layer), u.dtype),
      updates,
      layers,
    )
    return scaled, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
