"""Geometric rules: Model Stock (angle-based interpolation to θ0) and SLERP."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mergejax.rules import spec
from mergejax.tree import Params, to_compute


def _cosine(a, b, na=None, nb=None):
  """cos(a, b), 0 where either vanishes; `na`, `nb`: their norms, if known."""
  na = jnp.linalg.norm(a) if na is None else na
  nb = jnp.linalg.norm(b) if nb is None else nb
  ok = (na > 0) & (nb > 0)
  return jnp.where(ok, jnp.vdot(a, b) / jnp.where(ok, na * nb, 1.0), 0.0)


def model_stock(base: Params, experts: Sequence[Params]) -> Params:
  """Model Stock (Jang et al. 2024), per leaf: θ = θ0 + t · mean τ, t = N cos / (1 + (N−1) cos).

  cos is the mean pairwise cosine between the experts' task vectors on that leaf (clipped to
  [0, 1]; a leaf where all task vectors vanish keeps θ0).

  Args:
    base: pre-trained parameters θ0 (the anchor).
    experts: at least two fine-tuned models.

  Returns:
    Merged parameters.
  """
  n = len(experts)
  if n < 2:
    raise ValueError(f"model_stock needs at least 2 experts, got {n}.")

  def merge_leaf(b, *xs):
    b32 = to_compute(b)
    taus = [(to_compute(x) - b32).ravel() for x in xs]
    # Each norm once (not once per pair): a smaller program, and the same values.
    norms = [jnp.linalg.norm(tau) for tau in taus]
    pairs = [
      _cosine(taus[i], taus[j], norms[i], norms[j]) for i in range(n) for j in range(i + 1, n)
    ]
    cos = jnp.clip(sum(pairs) / len(pairs), 0.0, 1.0)
    t = n * cos / (1.0 + (n - 1) * cos)
    return (b32 + t * sum(taus).reshape(b.shape) / n).astype(b.dtype)

  return jax.tree.map(merge_leaf, base, *experts)


def slerp(
  base: Params,
  experts: Sequence[Params],
  *,
  t: Any = 0.5,
  on: str = "weights",
  eps: float = 1e-6,
) -> Params:
  """Spherical linear interpolation between two models, leaf by leaf.

  Falls back to linear interpolation where the two vectors are (anti-)parallel or one is zero.

  Args:
    base: pre-trained parameters θ0 (used for dtypes, and as the origin when on="task_vectors").
    experts: exactly two models (a, b).
    t: interpolation weight of b, in [0, 1].
    on: "weights" (interpolate θa and θb, as mergekit) or "task_vectors" (interpolate τa and τb
      and add the result to θ0).
    eps: |cos| above 1 − eps counts as parallel.

  Returns:
    Interpolated parameters.
  """
  if len(experts) != 2:
    raise ValueError(f"slerp interpolates exactly 2 models, got {len(experts)}.")
  if on not in ("weights", "task_vectors"):
    raise ValueError(f"on must be 'weights' or 'task_vectors', got {on!r}.")

  def merge_leaf(b, xa, xb):
    origin = to_compute(b) if on == "task_vectors" else jnp.zeros((), jnp.float32)
    a, c = to_compute(xa) - origin, to_compute(xb) - origin
    cos = _cosine(a.ravel(), c.ravel())
    parallel = (jnp.abs(cos) > 1 - eps) | (cos == 0) & (
      (jnp.linalg.norm(a) == 0) | (jnp.linalg.norm(c) == 0)
    )
    omega = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
    sin = jnp.where(parallel, 1.0, jnp.sin(omega))
    wa = jnp.where(parallel, 1.0 - t, jnp.sin((1.0 - t) * omega) / sin)
    wb = jnp.where(parallel, t, jnp.sin(t * omega) / sin)
    return (origin + wa * a + wb * c).astype(b.dtype)

  return jax.tree.map(merge_leaf, base, *experts)


spec.register("model_stock", model_stock, min_experts=2)
spec.register(
  "slerp",
  slerp,
  min_experts=2,
  max_experts=2,
  t=spec.UNIT,
  on=spec.choice("weights", "task_vectors"),
  eps=spec.HParam("float", 0.0, 1.0, "()", static=True),
)
