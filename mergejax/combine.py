"""Combiners: functions `list of task vectors -> one task vector` (sum, mean, TIES election +
disjoint merge), and the masks of TALL / Consensus merging.

All loops over experts are Python loops inside a leaf map, so XLA fuses them into one pass per leaf.
"""

from __future__ import annotations

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
    total = leafwise.total(sum(jnp.sum(x) for x in jax.tree.leaves(score)))
  fallback = jnp.where(total < 0, -1.0, 1.0)
  return jax.tree.map(lambda s: jnp.where(s > 0, 1.0, jnp.where(s < 0, -1.0, fallback)), score)


def disjoint_merge(vectors: Sequence[Params], sign: Params, *, reduce: str = "mean") -> Params:
  """TIES disjoint merge: combines, per entry, only the non-zero entries that agree with `sign`.

  Args:
    vectors: (trimmed) task vectors.
    sign: elected sign tree (±1), e.g. from `elect_sign`.
    reduce: "mean" over agreeing tasks (paper), "sum" (FusionBench default), or "max" (largest
      agreeing magnitude, with the elected sign).

  Returns:
    The merged task vector; 0 where no task agrees.
  """
  if reduce not in REDUCTIONS:
    raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}.")

  def merge_leaf(s, *xs):
    agree = [jnp.where(s > 0, x > 0, x < 0) for x in xs]
    if reduce == "max":
      return s * _max_abs(agree, xs)
    total = sum(jnp.where(a, x, 0.0) for a, x in zip(agree, xs, strict=True))
    if reduce == "sum":
      return total
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
) -> Params:
  """Elect + disjoint merge (TIES steps 2-3) on already sparsified task vectors."""
  sign = elect_sign(vectors, election=election, total=total)
  return disjoint_merge(vectors, sign, reduce=reduce)


def sum_combine(vectors: Sequence[Params]) -> Params:
  """Σt τt (task arithmetic)."""
  return tv.add(*vectors)


def mean_combine(vectors: Sequence[Params]) -> Params:
  """(1/T) Σt τt (weight averaging, in task-vector form)."""
  return tv.mean(vectors)


COMBINERS = {"sum": sum_combine, "mean": mean_combine, "ties": ties_combine}


def tall_masks(vectors: Sequence[Params], lambdas: jax.Array | float) -> list[Params]:
  """TALL masks (Wang et al. 2024): m_t = 1[|τt| ≥ λt · |τMTL − τt|], τMTL = Σt τt.

  Args:
    vectors: task vectors.
    lambdas: scalar or one λt per task (paper searches λt in [0.2, 0.6] on validation).

  Returns:
    One boolean tree per task.
  """
  lam = jnp.broadcast_to(jnp.asarray(lambdas, jnp.float32), (len(vectors),))
  multi = tv.add(*vectors)
  return [
    jax.tree.map(lambda x, m, t=t: jnp.abs(x) >= lam[t] * jnp.abs(m - x), v, multi)
    for t, v in enumerate(vectors)
  ]


def consensus_mask(masks: Sequence[Params], min_tasks: int = 2) -> Params:
  """Entries selected by at least `min_tasks` of the masks (Consensus merging, k = 2)."""
  return jax.tree.map(lambda *ms: sum(m.astype(jnp.int32) for m in ms) >= min_tasks, *masks)
