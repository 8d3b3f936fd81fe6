"""Gram matrices of the inputs of a flax model's linear layers (RegMean's statistics).

`regmean_statistics(apply_fn, params, batches)` runs `apply_fn(params, x)` under
`flax.linen.intercept_methods`: every call of a linear layer whose kernel is a leaf of `params`
adds Xᵀ X of its inputs to that kernel's Gram matrix (X: the inputs as rows, float32, at full
precision). Nothing in the model has to cooperate (no `sow`, no changed modules), so it works
for the models in `mergejax.models` and for a user's own linen model alike.

What counts as a linear layer:
* `nn.Dense` (kernel [d_in, d_out]): X is the input reshaped to [-1, d_in], so token and patch
  axes become rows, as the reference code does (`x.reshape(-1, x.shape[-1])` in a torch hook);
* `nn.DenseGeneral` contracting the input's trailing axes, without `batch_dims`: X is the input
  reshaped to [-1, ∏ contracted axes]. Attention's q/k/v projections (flax
  `MultiHeadDotProductAttention`: DenseGeneral kernels [d, heads, head_dim]) are three linear
  maps d → heads·head_dim with their own (equal) Gram matrices, as FusionBench treats Hugging
  Face CLIP's separate q_proj/k_proj/v_proj; the output projection [heads, head_dim, d] is a map
  heads·head_dim → d;
* nothing else: convolutions (patch embeddings), embeddings, `nn.Einsum` and norms have no Gram
  matrix and are averaged by RegMean (FusionBench: `nn.Linear` modules only).
A layer is found by its kernel: the very array (under jit, the tracer) that `params` holds at
that leaf path, so the Gram matrix is keyed by the kernel's path in `params` and a layer whose
kernel is not in `params` (a frozen head closed over by `apply_fn`) is left out. Layers inside
`nn.scan`, `nn.vmap` or other lifted transforms see sliced kernels and are not found.

A layer called several times in a forward pass (shared weights) sums its inputs over the calls.
The Gram matrix is the mean over all rows seen: Σ XᵀX / Σ rows, FusionBench's (and the RegMean
authors') normalization.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mergejax import tree as tree_lib
from mergejax.statistics import batches as batches_lib
from mergejax.tree import Params

_HIGHEST = jax.lax.Precision.HIGHEST


def _linear_call(context: Any, args: tuple, kwargs: dict) -> tuple[Any, Any] | None:
  """(kernel, inputs) of a linear layer's call, or None for any other method call."""
  module = context.module
  if context.method_name != "__call__" or not isinstance(module, nn.Dense | nn.DenseGeneral):
    return None
  x = args[0] if args else kwargs.get("inputs")
  if x is None or not module.has_variable("params", "kernel"):
    return None
  return module.get_variable("params", "kernel"), x


def _rows(module: nn.Module, x: jax.Array, path: str) -> jax.Array:
  """The layer's inputs as rows [-1, d_in]."""
  if isinstance(module, nn.DenseGeneral):
    if module.batch_dims:
      raise NotImplementedError(
        f"Layer {path!r}: DenseGeneral with batch_dims has one matrix per batch index; RegMean "
        "statistics do not support it (exclude the leaf)."
      )
    axes = module.axis if isinstance(module.axis, Sequence) else (module.axis,)
    axes = sorted(a % x.ndim for a in axes)
    if axes != list(range(x.ndim - len(axes), x.ndim)):
      raise NotImplementedError(
        f"Layer {path!r}: DenseGeneral contracts input axes {axes} of a rank-{x.ndim} input; "
        "only trailing axes become Gram rows (exclude the leaf)."
      )
    d_in = math.prod(x.shape[a] for a in axes)
  else:
    d_in = x.shape[-1]
  return x.reshape(-1, d_in).astype(jnp.float32)


def _capture(apply_fn, params, x, paths=None, order=None):
  """Runs `apply_fn(params, x)`; returns {kernel path: (Σ XᵀX, rows)} of its linear layers.

  `paths` restricts the layers (the rest of the forward pass is then dead code, which XLA drops:
  RegMean++ pays only for the layers up to the block it captures). `order`, a list, receives the
  kernel paths in the order of their first call.
  """
  kernels = {id(leaf): path for path, leaf in tree_lib.flatten(params).items()}
  grams: dict[str, tuple[jax.Array, jax.Array]] = {}

  def interceptor(next_fun, args, kwargs, context):
    call = _linear_call(context, args, kwargs)
    if call is not None:
      path = kernels.get(id(call[0]))
      if path is not None and (paths is None or path in paths):
        rows = _rows(context.module, call[1], path)
        gram = jnp.matmul(rows.T, rows, precision=_HIGHEST)
        count = jnp.asarray(rows.shape[0], jnp.int32)
        if path in grams:  # Shared weights: a second call adds its rows.
          gram, count = grams[path][0] + gram, grams[path][1] + count
        grams[path] = (gram, count)
        if order is not None and path not in order:
          order.append(path)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    apply_fn(params, x)
  return grams


def linear_layers(
  apply_fn: Callable[[Params, jax.Array], Any], params: Params, x: jax.Array
) -> list[str]:
  """Returns the kernel paths of the linear layers `apply_fn` calls, in forward order.

  Traced abstractly (`jax.eval_shape`): nothing is computed.

  Args:
    apply_fn: `apply_fn(params, x)`.
    params: parameters (a tree whose kernels are found by identity).
    x: one batch of inputs.

  Returns:
    Kernel paths ("a/b/kernel"), by first call.
  """
  order: list[str] = []
  jax.eval_shape(lambda p, x: _capture(apply_fn, p, x, order=order), params, x)
  return order


def gram_fn(apply_fn: Callable[[Params, jax.Array], Any], paths: Iterable[str] | None = None):
  """A jitted `f(params, x) -> {kernel path: (Σ XᵀX, rows)}` for one batch.

  Args:
    apply_fn: `apply_fn(params, x)`.
    paths: the kernels to capture (None: every linear layer whose kernel is in `params`).

  Returns:
    The jitted function (one compilation per batch shape).
  """
  return _jitted_capture(apply_fn, None if paths is None else frozenset(paths))


@functools.lru_cache(maxsize=64)
def _jitted_capture(apply_fn, paths):
  # Shared by every expert and batch of one apply_fn (and, for RegMean++, of one block).
  return jax.jit(lambda params, x: _capture(apply_fn, params, x, paths))


def accumulate_grams(fn: Callable[..., Any], params: Params, batches: Iterable[Any]) -> dict:
  """Mean Gram matrix of every captured layer over `batches`: {path: Σ XᵀX / Σ rows}."""
  sums: dict[str, Any] = {}
  seen = 0
  for batch in batches:
    seen += 1
    x, _ = batches_lib.unpack(batch)
    for path, (gram, rows) in fn(params, jnp.asarray(x)).items():
      old = sums.get(path)
      sums[path] = (gram, rows) if old is None else (old[0] + gram, old[1] + rows)
  if not seen:
    raise ValueError("Gram matrices need at least one batch of examples; got none.")
  return {path: gram / rows.astype(jnp.float32) for path, (gram, rows) in sums.items()}


def no_layer_error(what: str) -> ValueError:
  return ValueError(
    f"{what}: no nn.Dense / nn.DenseGeneral layer whose kernel is a leaf of `params` ran in "
    "apply_fn(params, x). `params` must be the very tree apply_fn hands to module.apply (for a "
    "backbone, apply_fn puts it under its key itself), and layers inside nn.scan / nn.vmap are "
    "not seen."
  )


def regmean_statistics(
  apply_fn: Callable[[Params, jax.Array], Any],
  params: Params,
  batches: Iterable[Any],
  *,
  max_examples: int | None = None,
) -> dict[str, Params]:
  """Computes RegMean's statistics: the mean Gram matrix of each linear layer's inputs.

  Args:
    apply_fn: `apply_fn(params, x)` running a flax linen model (its output is not used).
    params: the expert's parameters (the tree to be merged; e.g. the backbone).
    batches: the expert's task examples (see `mergejax.statistics.batches`), consumed once.
    max_examples: stop before a batch once this many examples were used (FusionBench uses 256
      per task); None uses every batch.

  Returns:
    {"grams": tree}: the tree has a [d_in, d_in] float32 matrix at each linear layer's kernel
    path and nothing else.

  Raises:
    ValueError: if no linear layer of `params` ran, or there were no batches.
  """
  fn = gram_fn(apply_fn)
  grams = accumulate_grams(fn, params, batches_lib.take(batches, max_examples))
  if not grams:
    raise no_layer_error("regmean_statistics")
  order = tree_lib.leaf_paths(params)
  return {"grams": tree_lib.unflatten({p: grams[p] for p in order if p in grams})}
