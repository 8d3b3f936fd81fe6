"""Rules that add or average whole task vectors: weight averaging, task arithmetic, negation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mergejax import combine
from mergejax import task_vectors as tv
from mergejax.rules import spec
from mergejax.tree import Params, to_compute


def weight_average(
  base: Params, experts: Sequence[Params], *, weights: Sequence[float] | None = None
) -> Params:
  """Weight averaging (model soup): θ = Σt wt θt / Σt wt.

  Args:
    base: pre-trained parameters (only their dtypes are used).
    experts: fine-tuned models.
    weights: one non-negative weight per expert (normalized to sum to one); None for the mean.

  Returns:
    The averaged parameters, in the dtypes of `base`.
  """
  n = len(experts)
  w = jnp.full((n,), 1.0 / n) if weights is None else jnp.asarray(weights, jnp.float32)
  if w.shape != (n,):
    raise ValueError(f"weights: expected one per expert ({n}), got shape {w.shape}.")
  w = w / jnp.sum(w)

  def average(b, *xs):
    return sum(w[i] * to_compute(x) for i, x in enumerate(xs)).astype(b.dtype)

  return jax.tree.map(average, base, *experts)


def task_arithmetic(
  base: Params, experts: Sequence[Params], *, scale: Any = 0.3, weights: Any = None
) -> Params:
  """Task arithmetic (Ilharco et al. 2023): θ = θ0 + λ Σt wt (θt − θ0).

  Args:
    base: pre-trained parameters θ0.
    experts: fine-tuned models θt.
    scale: λ (choose it on validation; 0.3 is the paper's usual value); mergekit's `lambda`.
    weights: per-expert weights wt (mergekit's `weight`): None (all 1), a scalar or one per
      expert. mergekit's `normalize: true` divides by Σ wt: pass scale=λ / Σ wt.

  Returns:
    Merged parameters.

  >>> base = {"w": jnp.zeros(2)}
  >>> task_arithmetic(base, [{"w": jnp.ones(2)}, {"w": jnp.array([1.0, -1.0])}], scale=0.5)["w"]
  Array([1., 0.], dtype=float32)
  """
  return tv.apply(base, combine.sum_combine(tv.task_vectors(base, experts), weights), scale)


def task_negation(base: Params, experts: Sequence[Params], *, scale: Any = 1.0) -> Params:
  """Task negation (forgetting): θ = θ0 − λ Σt τt.

  Args:
    base: pre-trained parameters θ0.
    experts: the models whose tasks are to be forgotten.
    scale: λ; the paper takes the largest λ keeping control accuracy ≥ 95% of θ0's.

  Returns:
    Parameters with the tasks subtracted.
  """
  return tv.apply(base, tv.negate(combine.sum_combine(tv.task_vectors(base, experts))), scale)


def _positive_weights(hparams: dict[str, Any], num_experts: int) -> None:
  del num_experts
  w = hparams["weights"]
  if w is not None and not isinstance(w, jax.core.Tracer) and float(jnp.sum(jnp.asarray(w))) <= 0:
    raise ValueError(f"weight_average: weights={w!r} must have a positive sum.")


def elementwise(hparams, ndim=None) -> bool:
  """`row_split` and `elementwise` of rules whose every output entry reads the same entry of the
  inputs."""
  del hparams, ndim
  return True


spec.register(
  "weight_average",
  weight_average,
  weights=spec.HParam("per_expert", low=0.0, optional=True),
  check=_positive_weights,
  row_split=elementwise,
  elementwise=elementwise,
)
spec.register(
  "task_arithmetic",
  task_arithmetic,
  scale=spec.SCALE,
  weights=spec.HParam("per_expert", optional=True),
  row_split=elementwise,
  elementwise=elementwise,
)
spec.register(
  "task_negation", task_negation, scale=spec.SCALE, row_split=elementwise, elementwise=elementwise
)
