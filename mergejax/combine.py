"""Combiners: functions `list of task vectors -> one task vector` (sum, mean, TIES election +
disjoint merge), and the masks of TALL / Consensus merging.

All loops over experts are Python loops inside a leaf map, so XLA fuses them into one pass per leaf.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from mergejax import leafwise
from mergejax import task_vectors as tv
from mergejax.tree import Params

ELECTIONS = ("mass", "count")
REDUCTIONS = ("mean", "sum", "max")


def elect_sign(
  vectors: Sequence[Params], *, election: str = "mass", total: jax.Array | None = None
) -> Params:
  """TIES sign election: the sign each entry of the merged vector takes (+1.0 or −1.0).

  Args:
    vectors: (trimmed) task vectors.
    election: "mass": sgn(Σt τt) (paper); "count": sgn(Σt sgn(τt)) (majority of tasks).
      Where the sum is 0, the sign of the sum of that statistic over all entries of all leaves is
      used (the paper's rule); if that is 0 too, +1.
    total: that sum, if the caller has it already (`sparsify.trim_experts` returns it); saves
      a global reduction that XLA on CPU compiles and runs poorly.

  Returns:
    A float32 tree of ±1.
  """
  if election not in ELECTIONS:
    raise ValueError(f"election must be one of {ELECTIONS}, got {election!r}.")
  if election == "mass":
    score = tv.add(*vectors)
  else:
    score = tv.add(*[jax.tree.map(jnp.sign, v) for v in vectors])
  if total is None:  # A whole-model sum: the streaming engine takes it in a pass of its own.
    partial = sum(jnp.sum(x) for x in jax.tree.leaves(score))
    # The fallback decides a result only where the score is 0 and some vector is not.
    tied = [
      jnp.any((s == 0) & functools.reduce(jnp.logical_or, [x != 0 for x in xs]))
      for s, *xs in zip(*(jax.tree.leaves(t) for t in (score, *vectors)), strict=True)
    ]
    negative = leafwise.total_is_negative(partial, functools.reduce(jnp.logical_or, tied))
  else:
    negative = total < 0
  fallback = jnp.where(negative, -1.0, 1.0)
  return jax.tree.map(lambda s: jnp.where(s > 0, 1.0, jnp.where(s < 0, -1.0, fallback)), score)


def weigh(vectors: Sequence[Params], weights: jax.Array | Sequence[float] | None) -> list[Params]:
  """Per-expert weights wt · τt (mergekit's `weight`); None leaves the vectors as they are.

  Args:
    vectors: task vectors.
    weights: a scalar, one weight per vector, or None.

  Returns:
    The weighted vectors.
  """
  if weights is None:
    return list(vectors)
  w = _weights(weights, len(vectors))
  return [jax.tree.map(lambda x, t=t: x * w[t], v) for t, v in enumerate(vectors)]


def _weights(weights, n: int) -> jax.Array:
  return jnp.broadcast_to(jnp.asarray(weights, jnp.float32), (n,))


def _safe_divisor(d: jax.Array) -> jax.Array:
  # mergekit's rule: a (near-)zero total weight divides by 1.
  return jnp.where(jnp.abs(d) < 1e-8, 1.0, d)


def disjoint_merge(
  vectors: Sequence[Params],
  sign: Params,
  *,
  reduce: str = "mean",
  weights: jax.Array | Sequence[float] | None = None,
) -> Params:
  """TIES disjoint merge: combines, per entry, only the non-zero entries that agree with `sign`.

  Args:
    vectors: (trimmed, weighted) task vectors.
    sign: elected sign tree (±1), e.g. from `elect_sign`.
    reduce: "mean" over agreeing tasks (paper), "sum" (FusionBench default), or "max" (largest
      agreeing magnitude, with the elected sign).
    weights: the per-expert weights already applied to `vectors` (see `weigh`): "mean" then
      divides by Σt wt over the agreeing tasks (mergekit's `normalize`) instead of their count.

  Returns:
    The merged task vector; 0 where no task agrees.
  """
  if reduce not in REDUCTIONS:
    raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}.")
  w = None if weights is None else _weights(weights, len(vectors))

  def merge_leaf(s, *xs):
    agree = [jnp.where(s > 0, x > 0, x < 0) for x in xs]
    if reduce == "max":
      return s * _max_abs(agree, xs)
    total = sum(jnp.where(a, x, 0.0) for a, x in zip(agree, xs, strict=True))
    if reduce == "sum":
      return total
    if w is not None:
      return total / _safe_divisor(sum(jnp.where(a, w[t], 0.0) for t, a in enumerate(agree)))
    count = sum(a.astype(jnp.float32) for a in agree)
    return total / jnp.maximum(count, 1.0)

  return jax.tree.map(merge_leaf, sign, *vectors)


def _max_abs(agree, xs):
  out = jnp.where(agree[0], jnp.abs(xs[0]), 0.0)
  for a, x in zip(agree[1:], xs[1:], strict=True):
    out = jnp.maximum(out, jnp.where(a, jnp.abs(x), 0.0))
  return out


def ties_combine(
  vectors: Sequence[Params],
  *,
  election: str = "mass",
  reduce: str = "mean",
  total: jax.Array | None = None,
  weights: jax.Array | Sequence[float] | None = None,
) -> Params:
  """Elect + disjoint merge (TIES steps 2-3) on already sparsified task vectors.

  With `weights`, mergekit's order: the vectors are weighted first, the sign is elected on
  Σt wt τt, and "mean" divides by the agreeing tasks' Σ wt (`total`, if given, must be of the
  weighted vectors).
  """
  vectors = weigh(vectors, weights)
  sign = elect_sign(vectors, election=election, total=total)
  return disjoint_merge(vectors, sign, reduce=reduce, weights=weights)


def sum_combine(vectors: Sequence[Params], weights=None) -> Params:
  """Σt wt τt (task arithmetic; wt = 1 without weights)."""
  return tv.add(*weigh(vectors, weights))


def mean_combine(vectors: Sequence[Params], weights=None) -> Params:
  """Σt wt τt / Σt wt ((1/T) Σt τt without weights: weight averaging in task-vector form)."""
  if weights is None:
    return tv.mean(vectors)
  total = _safe_divisor(jnp.sum(_weights(weights, len(vectors))))
  return jax.tree.map(lambda x: x / total, sum_combine(vectors, weights))


COMBINERS = {"sum": sum_combine, "mean": mean_combine, "ties": ties_combine}


def tall_masks(
  vectors: Sequence[Params], lambdas: jax.Array | float, multi: Params | None = None
) -> list[Params]:
  """TALL masks (Wang et al. 2024): m_t = 1[|τt| ≥ λt · |τMTL − τt|], τMTL = Σt τt.

  Args:
    vectors: task vectors.
    lambdas: scalar or one λt per task (paper searches λt in [0.2, 0.6] on validation).
    multi: the merged task vector the masks compare against; None: Σt τt (TALL, Consensus TA).
      Consensus TIES passes τ_TIES (the masks then compare θt with θ0 + τ_TIES).

  Returns:
    One boolean tree per task.
  """
  lam = jnp.broadcast_to(jnp.asarray(lambdas, jnp.float32), (len(vectors),))
  multi = tv.add(*vectors) if multi is None else multi
  return [
    jax.tree.map(lambda x, m, t=t: jnp.abs(x) >= lam[t] * jnp.abs(m - x), v, multi)
    for t, v in enumerate(vectors)
  ]


def consensus_mask(masks: Sequence[Params], min_tasks: int = 2) -> Params:
  """Entries selected by at least `min_tasks` of the masks (Consensus merging, k = 2)."""
  return jax.tree.map(lambda *ms: sum(m.astype(jnp.int32) for m in ms) >= min_tasks, *masks)


def election_total(stats, election: str, weights, num_experts: int) -> jax.Array:
  """The sign election's zero-sum fallback statistic from a trim's `selection.TopKStats`.

  Args:
    stats: the kept entries' sums (one group per expert, or per expert and leaf).
    election: "mass" (Σ of the kept values) or "count" (Σ of their signs).
    weights: per-expert weights or None (see `weigh`).
    num_experts: T.

  Returns:
    A float32 scalar: what `elect_sign` would sum over the trimmed, weighted vectors.
  """
  per_group = stats.kept_sum if election == "mass" else stats.kept_sign_sum
  if weights is None:
    return jnp.sum(per_group)
  w = jnp.broadcast_to(jnp.asarray(weights, jnp.float32), (num_experts,))
  signs = w if election == "mass" else jnp.sign(w)
  return jnp.sum(per_group.reshape(num_experts, -1).sum(1) * signs)
