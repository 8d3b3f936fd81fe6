"""Per-row sparsifiers: Model Breadcrumbs' and DELLA's masks, ranked within each output neuron's
fan-in (a row of a torch `[out, in]` weight, a column of a flax `[in, out]` kernel) or per leaf.
`mergejax.sparsify` re-exports them beside the whole-vector sparsifiers.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mergejax import host_row_stats, row_ranks, selection
from mergejax.leaf_random import _map_with_uniforms
from mergejax.tree import Params, is_float

ROW_SCOPES = ("leaf", "row")
# How a 2-D weight is laid out: flax kernels are [in, out], torch (safetensors, Hugging Face, with
# their torch names) weights [out, in]. "Per output neuron" rows run along the input axis.
LAYOUTS = ("flax", "torch")
# Breadcrumbs: "floor" (the reference's int() counts), "round" (mergejax before issue 10: at least
# one kept), "mergekit" (`magnitude_outliers`: int() counts, fewer outliers dropped when
# int(γn) + int(dn) > n, and density 1 returns the leaf untouched).
BREADCRUMBS_COUNTINGS = ("floor", "round", "mergekit")


def _row_axis(ndim: int, layout: str, torch_axis: int) -> int | None:
  """The axis a row runs along ("per output neuron"), or None for one row per leaf.

  Leaves of rank < 2 are one row. A torch weight [out, in, ...] runs along `torch_axis` (the
  reference code's axis); a flax kernel [..., in, out] along its input axis, ndim − 2 (axis 0 of
  a 2-D kernel, where the torch weight's axis 1 lands).
  """
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
  if ndim < 2:
    return None
  return torch_axis % ndim if layout == "torch" else ndim - 2


def _view_rows(x: jax.Array, scope: str, axis: int | None):
  """`x` as rows [r, m] (one row for scope "leaf" or `axis` None), and the inverse view."""
  if scope not in ROW_SCOPES:
    raise ValueError(f"scope must be one of {ROW_SCOPES}, got {scope!r}.")
  if scope == "leaf" or axis is None:
    return x.reshape(1, -1), lambda rows: rows.reshape(x.shape)
  moved = jnp.moveaxis(x, axis, -1)
  restore = lambda rows: jnp.moveaxis(rows.reshape(moved.shape), -1, axis)  # noqa: E731
  return moved.reshape(-1, moved.shape[-1]), restore


def breadcrumbs(
  vectors: Sequence[Params],
  density: jax.Array | float,
  gamma: jax.Array | float,
  *,
  scope: str = "row",
  layout: str = "flax",
  counting: str = "floor",
  inputs: tuple[Params, Sequence[Params]] | None = None,
  masks: Sequence[Params] | None = None,
) -> list[Params]:
  """Model Breadcrumbs mask: drops the top-`gamma` outliers by |τ| and keeps the next
  `density` fraction, per row (each output neuron's fan-in) or per leaf; zeroes the rest.

  The reference code (rezazzr/breadcrumbs, `TaskVectorMiddleKeep`) works along the last axis of
  each torch tensor: per row of a 2-D `[out, in]` weight (per output neuron), a 1-D leaf whole,
  a 0-D leaf untouched; here the same for 0-, 1- and 2-D leaves in both layouts. Leaves of rank
  ≥ 3 run along the torch tensor's last axis (the reference's) or, for a flax kernel, along its
  input axis ndim − 2 (no reference counterpart).

  Counts per row of m entries ("floor", the reference): n_top = int(γm) outliers dropped, then the
  n_keep = int(dm) largest of the rest kept (int(dm) = 0 keeps nothing). "round": n_keep =
  clip(round(dm), 1, m). "mergekit" (`magnitude_outliers`, usually with scope "leaf"): int()
  counts, n_top lowered to m − n_keep when both do not fit, density 1 leaves the leaf untouched.

  Args:
    vectors: task vectors.
    density: fraction kept (after the outliers), in (0, 1]; may be traced.
    gamma: fraction of largest entries dropped as outliers, in [0, 1); may be traced.
    scope: "row" (reference) or "leaf" (one ranking per leaf, as mergekit).
    layout: "flax" ([in, out] kernels, `hf.load_pretrained`'s layout and flax models) or
      "torch" ([out, in] weights as stored in safetensors / Hugging Face files with their torch
      names). The caller knows it from where the tree comes from; `run.merge_from_disk` resolves
      the CLI's "auto" from the checkpoint (see configs/merge.py).
    counting: "floor", "round" or "mergekit" (above).
    inputs: (base, experts) when `vectors` is `task_vectors(base, experts)`: the thresholds are
      then computed from the inputs as stored (on CPU: half the bytes of float32 |τ| for bf16
      checkpoints); the same masks.
    masks: the masks if the caller has them (`breadcrumbs_leaf_masks`, one tree per vector, True
      where kept: the streaming engine computes them on the host); None computes them.

  Returns:
    The masked task vectors (no rescaling; Breadcrumbs scales the sum by α afterwards).
  """
  if counting not in BREADCRUMBS_COUNTINGS:
    raise ValueError(f"counting must be one of {BREADCRUMBS_COUNTINGS}, got {counting!r}.")
  vectors = list(vectors)
  if not vectors:
    return []
  if masks is not None:
    keep = lambda v, k: jnp.where(k, v, 0.0)  # noqa: E731
    return [jax.tree.map(keep, v, k) for v, k in zip(vectors, masks, strict=True)]

  def mask_leaf(leaves, source):
    x = leaves[0]
    if scope == "row" and x.ndim == 0:
      return leaves  # The reference leaves scalars as they are.
    axis = _row_axis(x.ndim, layout, -1)
    views = [_view_rows(v, scope, axis) for v in leaves]
    m = views[0][0].shape[-1]
    n_top = selection.count_for_fraction(m, gamma, "floor")
    n_keep = selection.count_for_fraction(m, density, "round" if counting == "round" else "floor")
    if counting == "mergekit":
      n_top = jnp.minimum(n_top, m - n_keep)
    ks = [jnp.maximum(n_top, 1), jnp.clip(n_top + n_keep, 1, m)]
    # The vectors are float32(expert) − float32(base): the thresholds may read the inputs as
    # stored where that is exact (floating inputs of at most 32 bits).
    if source is not None and all(is_float(s) and s.dtype.itemsize <= 4 for s in source):
      base_rows, *expert_rows = [_view_rows(s, scope, axis)[0] for s in source]
      bounds = row_ranks.kth_largest_magnitudes_per_row(expert_rows, ks, origin=base_rows)
    else:
      bounds = row_ranks.kth_largest_magnitudes_per_row([rows for rows, _ in views], ks)
    masked = []
    for (rows, restore), (upper, lower) in zip(views, bounds, strict=True):
      magnitude = jnp.abs(rows)
      keep = (magnitude >= lower[:, None]) & ((n_top == 0) | (magnitude < upper[:, None]))
      out = jnp.where(keep & (n_keep > 0), rows, 0.0)
      if counting == "mergekit":
        out = jnp.where(jnp.asarray(density) >= 1.0, rows, out)
      masked.append(restore(out))
    return masked

  structure = jax.tree.structure(vectors[0])
  columns = list(zip(*[structure.flatten_up_to(v) for v in vectors], strict=True))
  if inputs is None:
    sources = [None] * len(columns)
  else:
    base, experts = inputs
    trees = [base, *experts]
    sources = list(zip(*[structure.flatten_up_to(t) for t in trees], strict=True))
  per_leaf = [mask_leaf(leaves, source) for leaves, source in zip(columns, sources, strict=True)]
  return [structure.unflatten(list(column)) for column in zip(*per_leaf, strict=True)]


def breadcrumbs_leaf_masks(
  base: np.ndarray,
  experts: Sequence[np.ndarray],
  *,
  density: float,
  gamma: float,
  scope: str = "row",
  layout: str = "flax",
  counting: str = "floor",
) -> list[np.ndarray]:
  """`breadcrumbs`' masks of one leaf's task vectors (True where kept), computed on the
  host before a program from the inputs as stored (the same masks: `host_row_stats`). The
  streaming engine's `leaf_stats` for Breadcrumbs (`streaming.flat`).

  Args:
    base: θ0's leaf.
    experts: the experts' leaves.
    density / gamma / scope / layout / counting: as for `breadcrumbs` (concrete values).

  Returns:
    bool arrays shaped like the leaf, one per expert (C-contiguous).
  """
  if scope == "row" and np.ndim(base) == 0:  # The reference leaves scalars as they are.
    return [np.ones((), np.bool_) for _ in experts]
  axis = None if scope == "leaf" else _row_axis(np.ndim(base), layout, -1)
  return host_row_stats.breadcrumbs_masks(
    base, experts, axis, density=density, gamma=gamma, counting=counting
  )


def della_spreads(vectors: Sequence[Params], *, scope: str = "row", layout: str = "flax"):
  """Where each entry's |τ| ranks in its row (0 smallest, m − 1 largest, ties in index order),
  mapped onto [-1, 1] (`row_ranks.ranks_per_row_many(..., spread=True)`): DELLA's keep
  probability is density + ε · spread.

  Args:
    vectors: task vectors.
    scope / layout: as for `della_drop`.

  Returns:
    float32 trees shaped like `vectors`, one per vector.
  """

  def rows_of(x):
    return _view_rows(x, scope, _row_axis(x.ndim, layout, 1))

  # Every expert's ranks of a leaf in one host call (`ranks_per_row_many`: on every core). Only
  # the ranks see the rows' view, the rest runs in the leaf's own layout: XLA recomputed fused
  # loops through transposes per consumer (a 384 x 1536 leaf, 8 experts: 0.17 -> 0.09 s).
  treedef = jax.tree.structure(vectors[0])
  columns = zip(*[treedef.flatten_up_to(v) for v in vectors], strict=True)
  spread = []
  for column in columns:
    views = [rows_of(x) for x in column]
    ranked = row_ranks.ranks_per_row_many([rows for rows, _ in views], spread=True)
    spread.append([restore(r) for (_, restore), r in zip(views, ranked, strict=True)])
  return [treedef.unflatten([leaf[t] for leaf in spread]) for t in range(len(vectors))]


def della_leaf_spreads(
  base: np.ndarray, experts: Sequence[np.ndarray], *, scope: str = "row", layout: str = "flax"
) -> list[np.ndarray]:
  """`della_spreads` of one leaf's task vectors, computed on the host before a program from the
  inputs as stored (the same numbers: `host_row_stats.della_spreads`). The streaming engine's
  `leaf_stats` for DELLA, which makes its program elementwise (`streaming.flat`).

  Args:
    base: θ0's leaf.
    experts: the experts' leaves.
    scope / layout: as for `della_drop`.

  Returns:
    float32 arrays shaped like the leaf, one per expert (C-contiguous).
  """
  axis = None if scope == "leaf" else _row_axis(np.ndim(base), layout, 1)
  return host_row_stats.della_spreads(base, experts, axis)


def della_drop(
  vectors: Sequence[Params],
  key: jax.Array,
  density: jax.Array | float,
  epsilon: jax.Array | float,
  *,
  scope: str = "row",
  layout: str = "flax",
  spreads: Sequence[Params] | None = None,
) -> list[Params]:
  """DELLA MagPrune: drop with a keep probability that grows with magnitude rank, rescale by 1/p.

  Within a row, the entry of rank r (0 = smallest |τ|, m − 1 = largest) is kept with probability
  p_r = density − ε + 2ε · r / (m − 1), and survivors are divided by p_r. Rows are per output
  neuron as in the reference (declare-lab/della ranks along dim 1 of the torch `[out, in]`
  weight): the input axis of either layout; 0- and 1-D leaves are one row. The reference's
  `window_size` is the whole width 2ε.

  Args:
    vectors: task vectors.
    key: PRNG key; leaf keys come from `leaf_key`.
    density: mean keep probability (1 − the reference's drop rate), in (0, 1]; may be traced.
    epsilon: half-width of the probability range; density ± ε must stay in (0, 1].
    scope: "row" (per output neuron, reference) or "leaf".
    layout: "flax" or "torch" (see `breadcrumbs`).
    spreads: `della_spreads(vectors, ...)` if the caller has them (the streaming engine computes
      them on the host); None computes them.

  Returns:
    The sparsified, rescaled task vectors.
  """
  if spreads is None:
    spreads = della_spreads(vectors, scope=scope, layout=layout)

  def drop(x, uniform, spread):
    p = jnp.clip(density + epsilon * spread, 1e-6, 1.0)
    return jnp.where(uniform < p, x / p, 0.0)

  return _map_with_uniforms(vectors, key, drop, spreads)
