"""`host_row_stats`: per-row statistics computed on the host from the inputs as stored give the
numbers the rules' programs compute from XLA's |τ| (ties, subnormals, every layout)."""

import jax
import ml_dtypes
import numpy as np
import pytest

from mergejax import host_row_stats, row_sparsify, selection
from mergejax import task_vectors as tv

TINY = np.finfo(np.float32).tiny


def _inputs(shape, dtype, seed=0, experts=3):
  rng = np.random.default_rng(seed)
  # A coarse grid: many ties in |τ|, zeros, both signs.
  base = (rng.integers(-4, 5, shape) / 4).astype(dtype)
  out = [(base.astype(np.float32) + rng.integers(-3, 4, shape) / 8).astype(dtype)]
  out += [(base.astype(np.float32) + rng.standard_normal(shape)).astype(dtype)]
  return base, (out * experts)[:experts]


def _program_spreads(base, experts, scope, layout):
  fn = jax.jit(
    lambda b, es: row_sparsify.della_spreads(tv.task_vectors(b, es), scope=scope, layout=layout)
  )
  return [np.asarray(s) for s in fn(base, experts)]


@pytest.mark.parametrize(
  "shape,scope,layout",
  [
    ((6, 5), "row", "flax"),  # Rows are a kernel's columns.
    ((6, 5), "row", "torch"),
    ((6, 5), "leaf", "flax"),
    ((7,), "row", "flax"),
    ((), "row", "torch"),
    ((2, 3, 4, 5), "row", "flax"),  # A conv kernel's input axis (2).
    ((2, 3, 4, 5), "row", "torch"),  # A torch conv weight's axis 1.
  ],
)
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_della_spreads_on_the_host_equal_the_programs(monkeypatch, shape, scope, layout, dtype):
  monkeypatch.setattr(host_row_stats, "_BLOCK", 8)  # Several blocks of rows.
  base, experts = _inputs(shape, dtype, seed=len(shape))
  axis = None if scope == "leaf" else row_sparsify._row_axis(len(shape), layout, 1)
  got = host_row_stats.della_spreads(base, experts, axis)
  want = _program_spreads(base, experts, scope, layout)
  for g, w in zip(got, want, strict=True):
    assert g.shape == shape and g.dtype == np.float32 and g.flags.c_contiguous
    np.testing.assert_array_equal(g, w)
  if shape:  # Each row's spreads are its ranks 0..m-1 mapped onto [-1, 1].
    assert got[0].min() == -1.0 and got[0].max() == 1.0


def test_della_spreads_read_subnormals_as_xla_does():
  # XLA on the CPU reads subnormal inputs as zero and flushes subnormal results: |τ| of 0, not
  # NumPy's tiny values, and ranks that tie them with the zeros (index order).
  base = np.array([0.0, TINY / 4, 0.0, 2 * TINY, 1.0, TINY * 1.5], np.float32)
  expert = np.array([TINY / 2, 0.0, 3e-39, 2 * TINY + TINY / 8, 1.0, 0.0], np.float32)
  got = host_row_stats.della_spreads(base, [expert], None)
  want = _program_spreads(base, [expert], "row", "flax")
  np.testing.assert_array_equal(got[0], want[0])
  # NumPy's own |τ| (subnormals kept) ranks differently: the test can tell.
  plain = np.abs(expert - base)
  ranks = np.argsort(np.argsort(plain, kind="stable"), kind="stable").astype(np.float32)
  assert (ranks / np.float32(plain.size - 1) * np.float32(2) - np.float32(1) != want[0]).any()


_SHAPES = [
  ((6, 5), "row", "flax"),
  ((6, 5), "row", "torch"),
  ((6, 5), "leaf", "torch"),
  ((9,), "row", "flax"),
  ((), "row", "flax"),  # Left as it is.
  ((), "leaf", "flax"),
  ((2, 3, 4, 5), "row", "flax"),
]
_COUNTS = [(0.3, 0.0, "floor"), (0.1, 0.1, "floor"), (0.5, 0.2, "round"), (0.8, 0.4, "mergekit"),
           (1.0, 0.3, "mergekit")]  # fmt: skip


@pytest.mark.parametrize(
  "shape,scope,layout,density,gamma,counting,dtype",
  [(*s, 0.5, 0.2, "floor", d) for s in _SHAPES for d in (np.float32, ml_dtypes.bfloat16)]
  + [((6, 5), "row", "flax", *c, np.float32) for c in _COUNTS],
)
def test_breadcrumbs_masks_on_the_host_equal_the_programs(
  monkeypatch, shape, scope, layout, density, gamma, counting, dtype
):
  monkeypatch.setattr(host_row_stats, "_BLOCK", 8)
  base, experts = _inputs(shape, dtype, seed=len(shape) + 1)
  masks = row_sparsify.breadcrumbs_leaf_masks(
    base, experts, density=density, gamma=gamma, scope=scope, layout=layout, counting=counting
  )

  @jax.jit
  def program(b, es, d, g):  # Density and γ traced, as rules.merge and the engine trace them.
    vectors = tv.task_vectors(b, es)
    return row_sparsify.breadcrumbs(
      vectors, d, g, scope=scope, layout=layout, counting=counting, inputs=(b, es)
    )

  want = program(base, experts, np.float32(density), np.float32(gamma))
  for mask, e, w in zip(masks, experts, want, strict=True):
    assert mask.shape == shape and mask.dtype == np.bool_
    tau = e.astype(np.float32) - base.astype(np.float32)
    np.testing.assert_array_equal(np.where(mask, tau, 0.0), w)
  if shape and counting != "mergekit" and density >= 0.3:  # Some kept, some dropped.
    assert 0 < np.mean(masks[1]) < 1


def test_counts_equal_the_traced_count_for_fraction():
  sizes = [1, 7, 100, 384, 1536, 4096]
  fractions = np.round(np.arange(0.0, 1.0001, 0.01), 2)
  for rounding in ("floor", "round"):
    for size in sizes:
      count = jax.jit(lambda f, s=size, r=rounding: selection.count_for_fraction(s, f, r))
      want = [int(count(np.float32(f))) for f in fractions]
      got = [host_row_stats._count(size, f, rounding) for f in fractions]
      assert got == want, (rounding, size)
