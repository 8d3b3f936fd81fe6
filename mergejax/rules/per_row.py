"""Per-row sparsify-then-combine rules: Model Breadcrumbs and DELLA, which rank |τ| within each
output neuron's fan-in (`mergejax.row_sparsify`), combined as `rules.sparse`' rules are.

Both take their per-row statistics (Breadcrumbs' masks, DELLA's rank spreads) as `with_stats`
from `leaf_stats` where the streaming engine merges a leaf in flat chunks: computed on the host
(`mergejax.host_row_stats`), they make the programs elementwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from mergejax import sparsify
from mergejax import task_vectors as tv
from mergejax.rules import spec
from mergejax.rules.sparse import COMBINE, WEIGHTS, _combine
from mergejax.tree import Params


def breadcrumbs(
  base: Params,
  experts: Sequence[Params],
  *,
  density: Any = 0.15,
  gamma: Any = 0.006,
  scale: Any = 0.2,
  scope: str = "row",
  layout: str = "flax",
  counting: str = "floor",
  combine: str = "sum",
  weights: Any = None,
) -> Params:
  """Model Breadcrumbs (Davari & Belilovsky 2024): drop outliers and small entries, sum, scale.

  Defaults are the reference code's: its search's seed point (density 0.15, γ 0.006, α 0.2),
  masks per output neuron (rows of the torch `[out, in]` weight) with int() counts; see
  `sparsify.breadcrumbs` for leaves that are not 2-D. mergekit's `breadcrumbs`
  (configs/breadcrumbs_mergekit.py) is `scope="leaf", counting="mergekit"`.

  Args:
    base: pre-trained parameters θ0.
    experts: fine-tuned models θt.
    density: fraction kept below the outliers.
    gamma: fraction of top-|τ| outliers dropped.
    scale: α.
    scope: "row" (per output neuron, reference) or "leaf" (mergekit).
    layout: "flax" ([in, out] kernels) or "torch" ([out, in] weights), which tells rows apart;
      see `sparsify.breadcrumbs` for how it is known.
    counting: "floor" (reference), "round" or "mergekit" (see `sparsify.breadcrumbs`).
    combine: "sum" (paper) or "ties" (Breadcrumbs→TIES); "mean" divides by Σ wt.
    weights: per-expert weights (mergekit's `weight`), applied after the masks.

  Returns:
    Merged parameters.
  """
  return _breadcrumbs(
    base, experts, None, density=density, gamma=gamma, scale=scale, scope=scope, layout=layout,
    counting=counting, combine=combine, weights=weights,
  )  # fmt: skip


def _breadcrumbs(
  base, experts, masks, *, density, gamma, scale, scope, layout, counting, combine, weights
):
  # `breadcrumbs` given its masks (`RuleSpec.with_stats`): `breadcrumbs_leaf_masks`', one
  # one-leaf tree per expert, where the streaming engine merges a leaf in flat chunks; None
  # computes them.
  vectors = sparsify.breadcrumbs(
    tv.task_vectors(base, experts), density, gamma, scope=scope, layout=layout,
    counting=counting, inputs=(base, experts), masks=masks,
  )  # fmt: skip
  return tv.apply(base, _combine(vectors, combine, weights=weights), scale)


def _breadcrumbs_leaf_stats(base, experts, *, density, gamma, scope, layout, counting, **hparams):
  # One leaf's masks as one-leaf trees: `with_stats` takes a tree of that leaf alone.
  del hparams
  masks = sparsify.breadcrumbs_leaf_masks(
    base, experts, density=density, gamma=gamma, scope=scope, layout=layout, counting=counting
  )
  return [{"x": m} for m in masks]


def della(
  base: Params,
  experts: Sequence[Params],
  *,
  key: jax.Array,
  density: Any = 0.7,
  epsilon: Any = 0.07,
  scale: Any = 1.1,
  scope: str = "row",
  layout: str = "flax",
  combine: str = "ties",
  weights: Any = None,
) -> Params:
  """DELLA-Merging (Deep et al. 2024): MagPrune (rank-dependent drop, 1/p rescale), elect, fuse.

  Defaults are the official example run (declare-lab/della): `--drop_rate 0.3` (density 0.7),
  `--window_size 0.14` (the whole probability window: its code passes ε = window / 2 = 0.07),
  `--lambda_factor 1.1`, ranks per output neuron.

  Args:
    base: pre-trained parameters θ0.
    experts: fine-tuned models θt.
    key: PRNG key.
    density: mean keep probability (1 − drop rate).
    epsilon: keep probabilities range over density ± ε by magnitude rank (half the window).
    scale: λ.
    scope: "row" (per output neuron, reference) or "leaf" (where ranks are taken).
    layout: "flax" or "torch" (see `sparsify.breadcrumbs`).
    combine: "ties" (paper: elect + fuse with a disjoint mean), "sum" or "mean".
    weights: per-expert weights (the reference's `weight`), applied after the drop.

  Returns:
    Merged parameters.
  """
  return _della(
    base, experts, None, key=key, density=density, epsilon=epsilon, scale=scale, scope=scope,
    layout=layout, combine=combine, weights=weights,
  )  # fmt: skip


def _della(
  base, experts, spreads, *, key, density, epsilon, scale, scope, layout, combine, weights
):
  # `della` given the spreads (`RuleSpec.with_stats`): `della_leaf_spreads`', one one-leaf tree
  # per expert, where the streaming engine merges a leaf in flat chunks; None computes them.
  vectors = sparsify.della_drop(
    tv.task_vectors(base, experts), key, density, epsilon, scope=scope, layout=layout,
    spreads=spreads,
  )  # fmt: skip
  return tv.apply(base, _combine(vectors, combine, weights=weights), scale)


def _della_leaf_stats(base, experts, *, scope, layout, **hparams):
  # One leaf's spreads as one-leaf trees: `with_stats` takes a tree of that leaf alone.
  del hparams
  spreads = sparsify.della_leaf_spreads(base, experts, scope=scope, layout=layout)
  return [{"x": s} for s in spreads]


def _della_window(hparams: dict[str, Any], num_experts: int) -> None:
  del num_experts
  d, e = hparams["density"], hparams["epsilon"]
  if any(isinstance(v, jax.core.Tracer) for v in (d, e)):
    return
  if not (0.0 <= float(e) and float(d) - float(e) > 0.0 and float(d) + float(e) <= 1.0):
    raise ValueError(
      f"della: density ± epsilon = {float(d):g} ± {float(e):g} must lie in (0, 1]: keep "
      "probabilities range over it."
    )


def _rows_kept_whole(torch_axis):
  # Per-row rules split along axis 0 when their rows run along another axis.
  def row_split(hparams, ndim):
    if hparams["scope"] != "row" or ndim < 2:
      return False
    return sparsify._row_axis(ndim, hparams["layout"], torch_axis) != 0

  return row_split


LAYOUT = spec.choice(*sparsify.LAYOUTS)
_BREADCRUMBS = dict(
  density=spec.FRACTION,
  gamma=spec.RATE,
  scale=spec.SCALE,
  scope=spec.choice(*sparsify.ROW_SCOPES),
  layout=LAYOUT,
  counting=spec.choice(*sparsify.BREADCRUMBS_COUNTINGS),
  combine=COMBINE,
  weights=WEIGHTS,
)
_BREADCRUMBS["row_split"] = _rows_kept_whole(-1)
_BREADCRUMBS["with_stats"] = _breadcrumbs
_BREADCRUMBS["leaf_stats"] = _breadcrumbs_leaf_stats
_BREADCRUMBS["elementwise"] = lambda hparams: True  # Given its masks (`leaf_stats`).
spec.register("breadcrumbs", breadcrumbs, **_BREADCRUMBS)
spec.register("breadcrumbs_ties", breadcrumbs, defaults={"combine": "ties"}, **_BREADCRUMBS)
spec.register(
  "della",
  della,
  with_stats=_della,
  leaf_stats=_della_leaf_stats,
  elementwise=lambda hparams: True,  # Given its spreads (`leaf_stats`).
  check=_della_window,
  row_split=_rows_kept_whole(1),
  key=spec.KEY,
  density=spec.FRACTION,
  epsilon=spec.HParam("float", 0.0, 1.0, "[)"),
  scale=spec.SCALE,
  scope=spec.choice(*sparsify.ROW_SCOPES),
  layout=LAYOUT,
  combine=COMBINE,
  weights=WEIGHTS,
)
