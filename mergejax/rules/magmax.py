"""MagMax (Marczak et al., ECCV 2024): per entry, the task-vector value of largest magnitude."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mergejax.rules import spec
from mergejax.rules.averaging import elementwise
from mergejax.tree import Params, to_compute


def magmax(base: Params, experts: Sequence[Params], *, scale: Any = 0.5) -> Params:
  """MagMax: θ = θ0 + λ τmax, τmax[j] = τ_{t*}[j], t* = argmax_t |τt[j]|.

  Ties in magnitude (|a| = |b|, whatever the signs) go to the later expert, as in the authors'
  code (a running selection replaced where |τt| ≥ |best|) and FusionBench.

  Args:
    base: pre-trained parameters θ0.
    experts: fine-tuned models θt.
    scale: λ (0.5: the authors' 8-task script and FusionBench's default).

  Returns:
    Merged parameters.

  >>> base = {"w": jnp.zeros(3)}
  >>> a, b = {"w": jnp.array([1.0, -2.0, 1.0])}, {"w": jnp.array([-3.0, 1.0, -1.0])}
  >>> magmax(base, [a, b], scale=1.0)["w"]
  Array([-3., -2., -1.], dtype=float32)
  """

  def leaf(b, *xs):
    b32 = to_compute(b)
    best = to_compute(xs[0]) - b32
    for x in xs[1:]:
      tau = to_compute(x) - b32
      best = jnp.where(jnp.abs(tau) >= jnp.abs(best), tau, best)
    return (b32 + scale * best).astype(b.dtype)

  return jax.tree.map(leaf, base, *experts)


spec.register("magmax", magmax, scale=spec.SCALE, row_split=elementwise, elementwise=elementwise)
