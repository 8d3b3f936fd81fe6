"""Per-row statistics of |θt − θ0| computed on the host from the inputs as stored, before a
program: DELLA's rank spreads (the numbers of `row_ranks.ranks_per_row_many(..., spread=True)` on
XLA's |τ|) and Model Breadcrumbs' masks (`row_sparsify.breadcrumbs`'). With them the streaming
engine's programs for these rules are elementwise, and a few serve every leaf shape
(`RuleSpec.leaf_stats`, `streaming.flat`).

Magnitudes are computed beside each sort in cache-sized blocks of rows, read from the inputs in
the leaf's own layout (a flax kernel's rows are its columns: a block of them is transposed in
cache), with XLA's CPU float mode: subnormal inputs read as zero, subnormal results flushed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mergejax import row_ranks, selection

# |τ| at or above this is the same whether subnormal inputs read as zero or not (a subnormal is
# below half an ulp of any input above 2^-100); nonzero ones below it are recomputed flushed.
_DAZ_EXACT_ABOVE = np.float32(2.0**-98)
_BLOCK = 1 << 17  # Entries per block of rows and input: its scratch stays in cache.


def della_spreads(
  base: np.ndarray, experts: Sequence[np.ndarray], axis: int | None
) -> list[np.ndarray]:
  """Per expert, the rank spread (`row_ranks.rank_spread`) of every entry of |f32(e) − f32(b)|
  within its row along `axis` (None: the whole leaf is one row).

  Args:
    base: θ0's leaf (any floating dtype, e.g. a memory-mapped bf16 tensor).
    experts: the experts' leaves, shaped like `base`.
    axis: the axis rows run along, or None.

  Returns:
    float32 arrays shaped like `base` (C-contiguous), one per expert.
  """

  def fill(magnitude, out):
    row_ranks.rank_rows_into(magnitude, out)
    row_ranks.rank_spread(out, magnitude.shape[1])

  return _per_row(base, experts, axis, fill, np.float32)


def breadcrumbs_masks(
  base: np.ndarray,
  experts: Sequence[np.ndarray],
  axis: int | None,
  *,
  density: float,
  gamma: float,
  counting: str,
) -> list[np.ndarray]:
  """Per expert, where Model Breadcrumbs keeps an entry of τ (`row_sparsify.breadcrumbs`' masks:
  thresholds at the k-th largest |τ| of each row along `axis`, None: the whole leaf; counts as
  its traced `selection.count_for_fraction` counts them).

  Args:
    base / experts / axis: as for `della_spreads`.
    density / gamma / counting: Breadcrumbs' (concrete values).

  Returns:
    bool arrays shaped like `base` (C-contiguous), True where kept, one per expert.
  """
  m = int(np.prod(np.shape(base))) if axis is None else np.shape(base)[axis]
  n_top = _count(m, gamma, "floor")
  n_keep = _count(m, density, "round" if counting == "round" else "floor")
  if counting == "mergekit":
    n_top = min(n_top, m - n_keep)
  upper_k, lower_k = max(n_top, 1), min(max(n_top + n_keep, 1), m)
  keep_all = counting == "mergekit" and np.float32(density) >= np.float32(1.0)

  def fill(magnitude, out):
    if keep_all or n_keep == 0:
      out[...] = keep_all
      return
    ascending = np.sort(magnitude, axis=-1)
    np.greater_equal(magnitude, ascending[:, m - lower_k, None], out=out)
    if n_top:
      out &= magnitude < ascending[:, m - upper_k, None]

  return _per_row(base, experts, axis, fill, np.bool_)


def _count(size: int, fraction: float, rounding: str) -> int:
  """`selection.count_for_fraction(size, fraction, rounding)` for a traced (float32) fraction,
  as the rules' programs count (tested against it)."""
  product = np.float32(fraction) * np.float32(size)
  if rounding == "round":
    k = np.round(product)
  else:
    k = np.floor(product * np.float32(selection._FLOOR_NUDGE))
  return int(min(max(int(k), 0 if rounding == "floor" else 1), size))


def _per_row(base, experts, axis, fill, dtype) -> list[np.ndarray]:
  """Per expert, `fill(magnitude, out)` on blocks of rows of |f32(e) − f32(b)| along `axis`
  (float32 [k, m], C-contiguous; `out`: [k, m] of `dtype`, the output's rows where they are
  C-contiguous, else scratch), assembled in the leaf's layout."""
  base = np.asarray(base)
  experts = [np.asarray(e) for e in experts]
  shape, ndim = base.shape, base.ndim
  if axis is None or ndim < 2:  # One row.
    rows_of = lambda a: a.reshape(1, -1)  # noqa: E731
  elif axis == ndim - 1:  # Rows along the last axis: views of the inputs.
    rows_of = lambda a: a.reshape(-1, shape[-1])  # noqa: E731
  elif ndim == 2 and axis == 0:  # A flax kernel's columns: transposed block by block.
    rows_of = lambda a: a.T  # noqa: E731
  else:  # Rows along another axis of an N-D leaf: moved last (a copy).
    moved = [np.ascontiguousarray(np.moveaxis(a, axis, -1)) for a in (base, *experts)]
    out = _per_row(moved[0], moved[1:], moved[0].ndim - 1, fill, dtype)
    return [np.ascontiguousarray(np.moveaxis(o, -1, axis)) for o in out]
  base_rows, expert_rows = rows_of(base), [rows_of(e) for e in experts]
  outputs = [np.empty(shape, dtype) for _ in experts]
  out_rows = [rows_of(o) for o in outputs]  # Views: written in place.
  n, m = base_rows.shape
  step = max(1, _BLOCK // max(m, 1))

  def work(start, stop, which):
    origin = _block(base_rows, start, stop)
    magnitude = np.empty((stop - start, m), np.float32)
    scratch = None
    for i in which:
      np.subtract(expert_rows[i][start:stop], origin, out=magnitude, dtype=np.float32)
      np.abs(magnitude, out=magnitude)
      # Zeros are zeros either way (e = b). The rare others below the bound: again, as XLA
      # computes them.
      low = (magnitude > 0) & (magnitude < _DAZ_EXACT_ABOVE)
      if low.any():
        where = np.nonzero(low)
        ours = _flush(_block(expert_rows[i], start, stop)[where])
        magnitude[where] = _flush(np.abs(ours - _flush(origin[where].copy())))
      target = out_rows[i][start:stop]
      if target.flags.c_contiguous:
        fill(magnitude, target)
        continue
      scratch = np.empty((stop - start, m), dtype) if scratch is None else scratch
      fill(magnitude, scratch)
      target[...] = scratch

  if n <= step:  # One block: one task per expert.
    tasks = [(0, n, [i]) for i in range(len(experts))]
  else:
    tasks = [(s, min(s + step, n), range(len(experts))) for s in range(0, n, step)]
  row_ranks.run_tasks(work, tasks)
  return outputs


def _block(rows: np.ndarray, start: int, stop: int) -> np.ndarray:
  """Rows [start, stop) as a C-contiguous float32 copy (a transposed view's: transposed here)."""
  out = np.empty((stop - start, rows.shape[1]), np.float32)
  out[...] = rows[start:stop]
  return out


def _flush(a: np.ndarray) -> np.ndarray:
  a[np.abs(a) < np.finfo(np.float32).tiny] = 0.0
  return a
