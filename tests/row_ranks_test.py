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


def test_many_arrays_ranked_in_one_host_call_equal_each_ranked_alone(monkeypatch):
  rng = np.random.default_rng(3)
  shapes = [(5, 9), (7,), (3, 4, 6), (5, 9)]  # Row lengths 9, 7, 6: blocks of rows per array.
  xs = [(rng.integers(-3, 4, s) / 2).astype(np.float32) for s in shapes]
  monkeypatch.setattr(row_ranks, "_RANK_BLOCK", 12)
  lowered = jax.jit(lambda *a: row_ranks.ranks_per_row_many(a)).lower(*xs).as_text()
  assert lowered.count("python_cpu_callback(") == 1  # One host call (buffer or pure callback).
  got = jax.jit(lambda *a: row_ranks.ranks_per_row_many(a))(*xs)
  assert [g.shape for g in got] == shapes
  for g, x in zip(got, xs, strict=True):
    np.testing.assert_array_equal(g, _device_ranks(x))


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
  xs = [(rng.integers(-4, 5, shape) / 4).astype(np.float32) for _ in range(3)]  # Ties, zeros.
  monkeypatch.setattr(row_ranks, "_KTH_BLOCK", 12)  # Several blocks of rows.
  m = shape[-1]
  ranks = jax.jit(lambda xs, k1, k2: row_ranks.kth_largest_magnitudes_per_row(xs, [k1, k2]))
  for k1, k2 in [(1, m), (2, 3), (m, 1)]:  # ks traced: one compilation.
    got = ranks(xs, k1, k2)
    assert got.shape == (3, 2, *shape[:-1]) and got.dtype == jnp.float32
    for x, per_k in zip(xs, got, strict=True):
      for k, g in zip((k1, k2), per_k, strict=True):
        np.testing.assert_array_equal(g, selection.kth_largest_magnitude_per_row(x, k))
        np.testing.assert_array_equal(g, -np.sort(-np.abs(x), axis=-1)[..., k - 1])
  assert ranks._cache_size() == 1


@pytest.mark.parametrize("block", [4, 1 << 18])  # Blocks of rows; one block, a task per input.
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_host_kth_from_inputs_equals_xla_differences(block, dtype, monkeypatch):
  """With an origin, the callback computes |x − origin| in float32 itself: the values XLA gets,
  subnormal inputs and results flushed to zero as XLA on CPU does (NumPy inherits XLA's
  floating-point mode in the callback and in the threads it starts)."""
  rng = np.random.default_rng(7)
  shape = (5, 3, 16)
  origin = rng.standard_normal(shape).astype(dtype)
  xs = [(origin.astype(np.float32) + rng.normal(0, 0.05, shape)).astype(dtype) for _ in range(3)]
  if dtype == jnp.float32:  # Subnormal inputs and differences in a row of their own.
    tiny = np.finfo(np.float32).tiny
    origin[0, 0] = np.linspace(-3, 3, 16) * tiny
    xs[0][0, 0] = origin[0, 0] + np.linspace(0.1, 0.9, 16) * tiny
    xs[1][0, 0, :4] = tiny * 0.5
  monkeypatch.setattr(row_ranks, "_KTH_BLOCK", block)

  def on_xla(xs, origin, k):  # The device path, compiled by XLA for the CPU.
    shift = origin.astype(jnp.float32)
    return [selection.kth_largest_magnitude_per_row(x.astype(jnp.float32) - shift, k) for x in xs]

  kth = jax.jit(lambda xs, o, k: row_ranks.kth_largest_magnitudes_per_row(xs, [k], origin=o))
  for k in (1, 2, 9, 16):
    got = kth(xs, origin, k)
    want = jax.jit(on_xla, static_argnums=2)(xs, origin, k)
    for i in range(3):
      np.testing.assert_array_equal(got[i, 0], want[i])
  if dtype == jnp.float32:  # Outside XLA, NumPy keeps subnormals: the flush is exercised.
    outside = np.empty((3, 1, 5, 3), np.float32)
    row_ranks._host_kth([outside], np.array([1]), origin, *xs, with_origin=True)
    assert kth(xs, origin, 1)[0, 0, 0, 0] != outside[0, 0, 0, 0]


@pytest.mark.parametrize("m", [1, 2, 7, 197, 384, 1536, 100_000])
def test_rank_spreads_are_the_same_bits_from_numpy_and_xla(m):
  # DELLA's spreads come from NumPy on the CPU host and from XLA on a mesh (and in XLA, r / c
  # is r * (1 / c)): one formula gives the same bits everywhere.
  ranks = np.arange(m, dtype=np.float32)
  want = row_ranks.rank_spread(ranks.copy(), m)
  np.testing.assert_array_equal(jax.jit(lambda r: row_ranks.rank_spread(r, m))(ranks), want)
  assert want[0] == (-1.0 if m > 1 else 0.0) and want[-1] == (1.0 if m > 1 else 0.0)
  assert (np.diff(want) > 0).all()
