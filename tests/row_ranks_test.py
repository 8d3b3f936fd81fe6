"""`row_ranks.ranks_per_row`: the host path gives XLA's stable double-argsort ranks exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax import row_ranks, selection


def _device_ranks(x):
  return jnp.argsort(jnp.argsort(jnp.abs(x), axis=-1), axis=-1).astype(jnp.float32)


@pytest.mark.parametrize("shape", [(1,), (7,), (5, 9), (3, 4, 6)])
def test_host_ranks_equal_stable_double_argsort(shape, monkeypatch):
  rng = np.random.default_rng(len(shape))
  # Ties: a coarse grid of values with both signs and zeros (|-x| ties with |x|).
  x = (rng.integers(-3, 4, shape) / 2).astype(np.float32)
  monkeypatch.setattr(row_ranks, "_RANK_BLOCK", 8)  # Several blocks of rows.
  got = jax.jit(row_ranks.ranks_per_row)(x)
  np.testing.assert_array_equal(got, _device_ranks(x))
  assert got.dtype == jnp.float32
  m = shape[-1]  # Each row holds a permutation of 0..m-1.
  np.testing.assert_array_equal(np.sort(np.asarray(got).reshape(-1, m), -1)[0], np.arange(m))


def test_split_programs_rank_on_the_device():
  x = np.random.default_rng(0).standard_normal((4, 33)).astype(np.float32)
  # Fresh functions: jit's trace cache does not see the thread-local switch.
  with selection.across_devices():
    lowered = jax.jit(lambda a: row_ranks.ranks_per_row(a)).lower(x).as_text()
  assert "callback" not in lowered
  assert "callback" in jax.jit(lambda a: row_ranks.ranks_per_row(a)).lower(x).as_text()


@pytest.mark.parametrize("shape", [(9,), (6, 10), (2, 3, 8)])
def test_host_kth_largest_equals_bisection(shape, monkeypatch):
  rng = np.random.default_rng(sum(shape))
  x = (rng.integers(-4, 5, shape) / 4).astype(np.float32)  # Ties and zeros.
  monkeypatch.setattr(row_ranks, "_RANK_BLOCK", 12)  # Several blocks of rows.
  m = shape[-1]
  ranks = jax.jit(lambda a, k1, k2: row_ranks.kth_largest_magnitudes_per_row(a, [k1, k2]))
  for k1, k2 in [(1, m), (2, 3), (m, 1)]:  # ks traced: one compilation.
    got = ranks(x, k1, k2)
    for k, g in zip((k1, k2), got, strict=True):
      np.testing.assert_array_equal(g, selection.kth_largest_magnitude_per_row(x, k))
      np.testing.assert_array_equal(g, -np.sort(-np.abs(x), axis=-1)[..., k - 1])
  assert ranks._cache_size() == 1
