"""Sparsify-then-combine rules: TIES, DARE, DARE-TIES (Breadcrumbs and DELLA: `per_row`).

Each rule is θ = θ0 + λ · combine(sparsify(τ1..τT)) with a sparsifier from
`mergejax.sparsify.SPARSIFIERS` and a combiner from `mergejax.combine.COMBINERS`; the named rules
are points of `rules.grid.sparsify_combine`'s grid (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mergejax import combine as combine_lib
from mergejax import selection, sparsify, streaming_topk
from mergejax import task_vectors as tv
from mergejax.rules import dare_trim, spec
from mergejax.rules.averaging import elementwise
from mergejax.tree import Params

ELECTION = spec.choice(*combine_lib.ELECTIONS)
REDUCE = spec.choice(*combine_lib.REDUCTIONS)
COMBINE = spec.choice(*combine_lib.COMBINERS)


# Per-expert weights with mergekit's meaning: wt multiplies τt after the sparsifier and before the
# sign election; sums are Σt wt τt, TIES's disjoint mean and the "mean" combiner divide by Σ wt.
WEIGHTS = spec.HParam("per_expert", optional=True)


def _combine(vectors, combine: str, election: str = "mass", reduce: str = "mean", weights=None):
  if combine == "ties":
    return combine_lib.ties_combine(vectors, election=election, reduce=reduce, weights=weights)
  return combine_lib.COMBINERS[combine](vectors, weights)


def _ties(
  base, experts, trim_stats, *, density, scale, trim_scope, election, reduce, counting, weights
):
  vectors, stats = sparsify.trim_experts(
    base, experts, density, scope=trim_scope, stats=trim_stats, counting=counting
  )
  total = combine_lib.election_total(stats, election, weights, len(experts))
  merged = combine_lib.ties_combine(
    vectors, election=election, reduce=reduce, total=total, weights=weights
  )
  return tv.apply(base, merged, scale)


def ties_merging(
  base: Params,
  experts: Sequence[Params],
  *,
  density: Any = 0.2,
  scale: Any = 1.0,
  trim_scope: str = "model",
  election: str = "mass",
  reduce: str = "mean",
  counting: str = "round",
  weights: Any = None,
) -> Params:
  """TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint merge, scale.

  Paper defaults: top 20% over the whole flattened task vector, mass election, disjoint mean,
  λ = 1 without validation. FusionBench's setting is `reduce="sum", scale=0.3`; mergekit's
  (configs/ties_mergekit.py) `trim_scope="leaf", counting="mergekit"` with its `weight`s.

  Args:
    base: pre-trained parameters θ0.
    experts: fine-tuned models θt.
    density: fraction of each task vector kept by the trim, in (0, 1].
    scale: λ.
    trim_scope: "model" (one threshold over all leaves) or "leaf".
    election: "mass" or "count" (see `combine.elect_sign`).
    reduce: "mean", "sum" or "max" (see `combine.disjoint_merge`); mergekit's `normalize: true`
      is "mean", `false` is "sum".
    counting: entries kept per group: "round" (clip(round(d·n), 1, n)) or "mergekit"
      (max(1, int(d·n))).
    weights: per-expert weights (mergekit's `weight`): None (all 1), a scalar or one per expert;
      they multiply the trimmed τt before the election, and "mean" divides by Σ wt of the
      agreeing tasks.

  Returns:
    Merged parameters.
  """
  return _ties(
    base,
    experts,
    None,
    density=density,
    scale=scale,
    trim_scope=trim_scope,
    election=election,
    reduce=reduce,
    counting=counting,
    weights=weights,
  )


def _ties_prepare(base, experts, *, density, trim_scope, counting, **unused):
  # On CPU the exact selection runs in NumPy on the experts' buffers, outside jit (TIES on
  # 22M x 8 experts: 0.45 s, against 1.1-1.2 s with the selection inside jit). Counts are taken
  # from the concrete float64 density here (Python's int(d * n) exactly).
  del unused
  return sparsify.trim_stats_eager(
    base, experts, float(density), scope=trim_scope, counting=counting
  )


def _ties_stream_stats(
  leaves, sizes, *, density, trim_scope, election, counting, memory_budget=None, **unused
):
  # Out of core: the model-scope thresholds from `streaming_topk.model_top_k_stats` (the in-memory
  # host selection when it fits the budget, else two exact histogram passes); leaf scope's leaf
  # by leaf (one pass). Counts as `sparsify.trim_stats_eager` takes them.
  del unused
  rounding = "floor_min1" if counting == "mergekit" else "round"
  if trim_scope == "model":
    k = int(selection.count_for_fraction(sum(sizes), float(density), rounding))
    stats = streaming_topk.model_top_k_stats(leaves, sizes, k, memory_budget)
    return lambda i: stats
  per_leaf = []
  for (base, experts), size in zip(leaves(), sizes, strict=True):
    k = int(selection.count_for_fraction(size, float(density), rounding))
    per_leaf.append(
      selection.top_k_stats_eager(
        [[x] for x in experts], [k] * len(experts), origins=[[base]] * len(experts)
      )
    )
  # `_ties` sums the election statistic over its stats: put the whole model's sum in entry 0.
  field = "kept_sum" if election == "mass" else "kept_sign_sum"
  whole = np.float32(np.sum(np.concatenate([np.asarray(getattr(s, field)) for s in per_leaf])))

  def leaf_stats(i):
    s = per_leaf[i]
    column = jnp.zeros_like(getattr(s, field)).at[0].set(whole)
    return s._replace(**{field: column})

  return leaf_stats


def dare(
  base: Params,
  experts: Sequence[Params],
  *,
  key: jax.Array,
  density: Any = 0.1,
  scale: Any = 1.0,
  rescale: str = "inverse",
  combine: str = "sum",
  weights: Any = None,
) -> Params:
  """DARE (Yu et al. 2024): random drop with p = 1 − density, rescale, then combine.

  Args:
    base: pre-trained parameters θ0.
    experts: fine-tuned models θt.
    key: PRNG key (one key per expert and leaf path is derived from it).
    density: keep probability (paper: p = 0.9 drop, i.e. density 0.1).
    scale: λ.
    rescale: "inverse" (1/(1−p), paper), "l1" (mergekit) or "none".
    combine: "sum" (DARE + task arithmetic), "ties" (DARE-TIES) or "mean".
    weights: per-expert weights (mergekit's `weight`, applied after the drop); None: all 1.

  Returns:
    Merged parameters.
  """
  vectors = sparsify.random_drop(tv.task_vectors(base, experts), key, density, rescale=rescale)
  return tv.apply(base, _combine(vectors, combine, weights=weights), scale)


def dare_ties(
  base: Params,
  experts: Sequence[Params],
  *,
  key: jax.Array,
  density: Any = 0.1,
  scale: Any = 1.0,
  rescale: str = "inverse",
  election: str = "mass",
  reduce: str = "mean",
  trim_density: Any = 0.2,
  weights: Any = None,
) -> Params:
  """DARE-TIES: DARE's random drop and rescale, then TIES (trim, sign election, disjoint merge).

  Default: the DARE paper's code (MergeLM): DARE with 1/(1−p), then full TIES: top
  `trim_density` over the whole task vector, mass election, disjoint mean. mergekit's
  `dare_ties` (configs/dare_ties_mergekit.py) has no trim, L1 rescale and a disjoint sum:
  `trim_density=None, rescale="l1", reduce="sum"`. mergejax before issue 10: `trim_density=None`.

  Args:
    base: pre-trained parameters θ0.
    experts: fine-tuned models θt.
    key: PRNG key.
    density: keep probability.
    scale: λ.
    rescale: as for `dare`.
    election: "mass" or "count".
    reduce: "mean", "sum" or "max".
    trim_density: TIES trim after the drop (fraction kept of the whole task vector, counted over
      all entries, zeros included); None: no trim.
    weights: per-expert weights (mergekit's `weight`), applied before the election.

  Returns:
    Merged parameters.
  """
  return dare_trim.with_stats(
    base, experts, None, key=key, density=density, scale=scale, rescale=rescale,
    election=election, reduce=reduce, trim_density=trim_density, weights=weights,
  )  # fmt: skip


def _per_leaf_rescale(hparams, ndim=None) -> bool:  # DARE's "l1" rescale sums over the leaf.
  del ndim
  return hparams["rescale"] != "l1"


spec.register(
  "ties",
  ties_merging,
  row_split=elementwise,
  elementwise=elementwise,
  prepare=_ties_prepare,
  with_stats=_ties,
  stream_stats=_ties_stream_stats,
  density=spec.FRACTION,
  scale=spec.SCALE,
  trim_scope=spec.choice(*sparsify.TRIM_SCOPES),
  election=ELECTION,
  reduce=REDUCE,
  counting=spec.choice(*sparsify.TRIM_COUNTINGS),
  weights=WEIGHTS,
)
spec.register(
  "dare",
  dare,
  row_split=_per_leaf_rescale,
  elementwise=_per_leaf_rescale,
  key=spec.KEY,
  density=spec.FRACTION,
  scale=spec.SCALE,
  rescale=spec.choice(*sparsify.RESCALES),
  combine=COMBINE,
  weights=WEIGHTS,
)
spec.register(
  "dare_ties",
  dare_ties,
  row_split=_per_leaf_rescale,
  elementwise=_per_leaf_rescale,
  prepare=dare_trim.prepare,
  with_stats=dare_trim.with_stats,
  stream_stats=dare_trim.stream_stats,
  key=spec.KEY,
  density=spec.FRACTION,
  scale=spec.SCALE,
  rescale=spec.choice(*sparsify.RESCALES),
  election=ELECTION,
  reduce=REDUCE,
  trim_density=spec.HParam("float", 0.0, 1.0, "(]", optional=True),
  weights=WEIGHTS,
)
