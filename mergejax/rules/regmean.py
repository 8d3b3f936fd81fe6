"""RegMean (Jin et al., ICLR 2023) and RegMean++ (Nguyen et al., 2025): linear layers merged by
least squares on each task's inputs.

For a linear layer with kernel W (flax layout [d_in, d_out]) and task t's inputs Xt (one row per
example, token or patch), RegMean solves min_W Σt ‖Xt W − Xt Wt‖², whose solution is
W = (Σt Gt)⁻¹ Σt Gt Wt with Gt = Xtᵀ Xt: the flax layout is already the one the formula is
written in (a torch weight [out, in] would be transposed first). As in the reference code
(the authors' repository and FusionBench), Gt is the *mean* over rows, Xtᵀ Xt / nt, and its
off-diagonal entries are scaled by α: G̃t = α Gt + (1 − α) diag(Gt) (α = 1 is the plain least
squares; smaller α pulls the merge towards a per-input-feature weighted average). Every other
floating leaf (biases, norms, embeddings, convolutions, layers without statistics) is the mean
of the experts, as in the reference. θ0 is not used (only its dtypes).

RegMean++ is the same closed form on other Gram matrices: those of layer l's inputs when task
t's examples run through the *merged* layers below l (and through expert t's own layer l), which
`mergejax.statistics.regmean_plusplus_statistics` computes layer by layer. Those Gram matrices
depend on the merge of the layers below, hence on α: the statistics record the α they were
computed with, and `regmean_plusplus` refuses another one.

Statistics: one dict per expert, {"grams": tree}, the tree keyed like the parameters and holding
a [d_in, d_in] float32 matrix at each linear layer's kernel (RegMean++ adds "alpha"). A
DenseGeneral kernel [d_in, heads, head_dim] or [heads, head_dim, d_out] is the matrix
[∏ leading axes, ∏ trailing axes] whose leading axes multiply to d_in.

Arithmetic is float32 (matrix products at full precision, also on accelerators where float32
matmuls default to reduced precision); outputs have the dtypes of `base`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mergejax import tree as tree_lib
from mergejax.rules import spec
from mergejax.rules import statistics_check as check_lib
from mergejax.tree import Params, to_compute

_HIGHEST = jax.lax.Precision.HIGHEST


def reduce_off_diagonal(gram: jax.Array, alpha: Any) -> jax.Array:
  """Returns α G + (1 − α) diag(G): off-diagonal entries scaled by α, the diagonal kept.

  Args:
    gram: a square matrix.
    alpha: the off-diagonal scale (FusionBench's `reduce_non_diagonal_ratio`).

  Returns:
    The matrix with the same diagonal.

  >>> reduce_off_diagonal(jnp.array([[2.0, 1.0], [1.0, 3.0]]), 0.5)
  Array([[2. , 0.5],
         [0.5, 3. ]], dtype=float32)
  """
  gram = to_compute(gram)
  return alpha * gram + (1.0 - alpha) * jnp.diag(jnp.diagonal(gram))


def regmean_solve(
  grams: Sequence[jax.Array], kernels: Sequence[jax.Array], alpha: Any
) -> jax.Array:
  """RegMean's closed form for one layer: (Σt G̃t)⁻¹ Σt G̃t Wt, in float32.

  Args:
    grams: each task's [d_in, d_in] Gram matrix.
    kernels: each task's kernel, [d_in, ...] once its leading axes are merged (any shape whose
      leading axes multiply to d_in).
    alpha: off-diagonal scale of the Gram matrices.

  Returns:
    The merged kernel, float32, in the kernels' shape.
  """
  d_in = grams[0].shape[0]
  shape = kernels[0].shape
  k = check_lib.kernel_split(tuple(shape), d_in)
  if k is None:
    raise ValueError(f"A kernel of shape {shape} does not take {d_in} inputs.")
  reduced = [reduce_off_diagonal(g, alpha) for g in grams]
  lhs = sum(reduced)
  rhs = sum(
    jnp.matmul(g, to_compute(w).reshape(d_in, -1), precision=_HIGHEST)
    for g, w in zip(reduced, kernels, strict=True)
  )
  with jax.default_matmul_precision("highest"):
    return jnp.linalg.solve(lhs, rhs).reshape(shape)


def regmean(
  base: Params, experts: Sequence[Params], statistics: Sequence[Any], *, alpha: Any = 0.9
) -> Params:
  """RegMean: per linear layer W = (Σt G̃t)⁻¹ Σt G̃t Wt; every other leaf the experts' mean.

  Args:
    base: pre-trained parameters (only their structure and dtypes are used).
    experts: fine-tuned models θt.
    statistics: one dict per expert with "grams": the Gram matrices of its linear layers' inputs
      on its task's examples, keyed by kernel path (`mergejax.statistics.regmean_statistics`).
    alpha: off-diagonal scale α of the Gram matrices, in [0, 1] (0.9, METHODS.md; FusionBench
      uses 0.6 for CLIP; 1 is plain least squares); traced, so a sweep compiles once.

  Returns:
    Merged parameters in the dtypes of `base`.

  >>> base = {"w": jnp.zeros((2, 1)), "b": jnp.zeros(1)}
  >>> experts = [{"w": jnp.array([[1.0], [0.0]]), "b": jnp.ones(1)},
  ...            {"w": jnp.array([[0.0], [1.0]]), "b": jnp.zeros(1)}]
  >>> stats = [{"grams": {"w": jnp.diag(jnp.array([3.0, 0.0]))}},
  ...          {"grams": {"w": jnp.diag(jnp.array([0.0, 1.0]))}}]
  >>> merged = regmean(base, experts, stats, alpha=1.0)
  >>> merged["w"][:, 0], merged["b"]
  (Array([1., 1.], dtype=float32), Array([0.5], dtype=float32))
  """
  flats = [tree_lib.flatten(s["grams"]) for s in statistics]
  n = len(experts)

  def leaf(key_path, b, *xs):
    path = tree_lib.path_str(key_path)
    if not tree_lib.is_float(b):
      return b
    if path in flats[0]:
      merged = regmean_solve([f[path] for f in flats], xs, alpha)
    else:
      merged = sum(to_compute(x) for x in xs) / n
    return merged.astype(b.dtype)

  return jax.tree.map_with_path(leaf, base, *experts)


def regmean_plusplus(
  base: Params, experts: Sequence[Params], statistics: Sequence[Any], *, alpha: Any = 0.95
) -> Params:
  """RegMean++: RegMean's closed form on Gram matrices of inputs from the merged lower layers.

  Args:
    base: pre-trained parameters (only their structure and dtypes are used).
    experts: fine-tuned models θt.
    statistics: from `mergejax.statistics.regmean_plusplus_statistics` (one dict per expert,
      with "grams" and the "alpha" they were computed with).
    alpha: off-diagonal scale α; must be the statistics' α (0.95: FusionBench's RegMean++
      config, the authors' code).

  Returns:
    Merged parameters in the dtypes of `base`.
  """
  return regmean(base, experts, statistics, alpha=alpha)


def _grams_for(rule: str, plusplus: bool):
  source = "regmean_plusplus_statistics" if plusplus else "regmean_statistics"

  def select(base, selected, statistics, hparams, num_experts):
    flats = check_lib.per_expert(rule, statistics, num_experts, kind="grams", source=source)
    check_lib.check_known(rule, flats, set(tree_lib.leaf_paths(base)), "grams")
    paths = check_lib.check_grams(rule, flats, selected)
    out = [{"grams": {p: f[p] for p in paths}} for f in flats]
    if plusplus:
      _check_alpha(rule, statistics, hparams["alpha"])
    return out

  return select


def _check_alpha(rule: str, statistics: Sequence[Any], alpha: Any) -> None:
  """RegMean++'s Gram matrices depend on α (through the merged lower layers): they must agree."""
  values = []
  for t, entry in enumerate(statistics):
    if "alpha" not in entry:
      raise ValueError(
        f"{rule}: statistics[{t}] has no 'alpha': these are RegMean statistics. RegMean++ needs "
        "the inputs of each layer through the merged layers below it: compute them with "
        "mergejax.statistics.regmean_plusplus_statistics (or merge with rule 'regmean')."
      )
    values.append(round(float(jax.device_get(entry["alpha"])), 6))  # float32 0.95 -> 0.95.
  wanted = check_lib.concrete_scalar(alpha)
  if len(set(values)) > 1 or (wanted is not None and abs(values[0] - wanted) > 1e-6):
    raise ValueError(
      f"{rule}: the statistics were computed with alpha={values}, the merge asks for "
      f"alpha={wanted}. Each layer's inputs come from the layers below merged with that alpha: "
      f"pass alpha={values[0]} or recompute the statistics with alpha={wanted}."
    )


_ALPHA = spec.HParam("float", 0.0, 1.0, "[]")
spec.register("regmean", regmean, alpha=_ALPHA, statistics=_grams_for("regmean", plusplus=False))
spec.register(
  "regmean_plusplus",
  regmean_plusplus,
  alpha=_ALPHA,
  statistics=_grams_for("regmean_plusplus", plusplus=True),
)
