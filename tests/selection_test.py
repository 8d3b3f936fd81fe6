"""Exact k-th largest magnitude: host (NumPy) and bisection (XLA) agree with a sort, bit for bit."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from mergejax import selection


def _reference(leaves, k):
  flat = np.concatenate([np.abs(np.asarray(x, np.float32)).ravel() for x in leaves])
  return np.sort(flat)[::-1][k - 1]


def _leaves(seed=0):
  rng = np.random.default_rng(seed)
  return [
    rng.standard_normal((17, 5)).astype(np.float32),
    np.zeros((3,), np.float32),  # Zeros and
    np.array([2.5, -2.5, 2.5], np.float32),  # exact ties.
    np.float32(rng.standard_normal()),  # A scalar leaf.
    (rng.standard_normal(40) * 1e-30).astype(np.float32),  # Denormal-range magnitudes.
  ]


class KthLargestTest(parameterized.TestCase):
  @parameterized.product(method=["host", "bisect", "auto"], k=[1, 2, 3, 4, 10, 50, 90, 132])
  def test_matches_sort(self, method, k):
    leaves = _leaves()
    got = jax.jit(lambda ls, k: selection.kth_largest_magnitude(ls, k, method=method))(leaves, k)
    self.assertEqual(float(got), float(_reference(leaves, k)))

  def test_bisect_and_host_agree_bitwise_on_random_data(self):
    leaves = [np.random.default_rng(1).standard_normal(10_000).astype(np.float32)]
    for k in (1, 17, 5000, 9999, 10_000):
      host = selection.kth_largest_magnitude(leaves, k, method="host")
      bisect = selection.kth_largest_magnitude(leaves, k, method="bisect")
      np.testing.assert_array_equal(np.asarray(host), np.asarray(bisect))

  def test_changing_k_does_not_retrace(self):
    fn = jax.jit(chex.assert_max_traces(selection.kth_largest_magnitude, n=1))
    leaves = _leaves()
    for k in (1, 5, 9):
      fn(leaves, jnp.int32(k))

  def test_unknown_method(self):
    with self.assertRaisesRegex(ValueError, "method"):
      selection.kth_largest_magnitude([jnp.ones(3)], 1, method="sort")

  def test_per_row(self):
    x = np.random.default_rng(2).standard_normal((6, 9)).astype(np.float32)
    for k in (1, 4, 9):
      got = selection.kth_largest_magnitude_per_row(jnp.asarray(x), k)
      np.testing.assert_array_equal(np.asarray(got), np.sort(np.abs(x), axis=1)[:, ::-1][:, k - 1])

  @parameterized.parameters((0.2, 10, 2), (0.01, 10, 1), (1.0, 7, 7), (0.5, 3, 2))
  def test_count_for_fraction(self, fraction, size, expected):
    self.assertEqual(int(selection.count_for_fraction(size, fraction)), expected)


if __name__ == "__main__":
  absltest.main()


class TopKStatsTest(parameterized.TestCase):
  def _reference(self, groups, origins, ks):
    out = []
    for g, o, k in zip(groups, origins, ks, strict=True):
      d = np.concatenate(
        [(np.asarray(x) - np.asarray(y)).ravel() for x, y in zip(g, o, strict=True)]
      )
      th = np.sort(np.abs(d))[::-1][k - 1]
      kept = np.abs(d) >= th
      out.append((th, d[kept].sum(), np.sign(d[kept]).sum()))
    return np.asarray(out, np.float32).T

  def _case(self):
    rng = np.random.default_rng(3)
    base = [
      rng.standard_normal((300, 70)).astype(np.float32),
      rng.standard_normal(9).astype(np.float32),
    ]
    experts = [
      [b + rng.standard_normal(b.shape).astype(np.float32) for b in base] for _ in range(3)
    ]
    return experts, [base] * 3, [4203, 1, 21009]

  @parameterized.parameters("host", "bisect", "eager")
  def test_stats_match_reference(self, method):
    groups, origins, ks = self._case()
    if method == "eager":
      stats = selection.top_k_stats_eager(groups, ks, origins=origins)
    else:
      stats = jax.jit(lambda g, o, k: selection.top_k_stats(g, k, origins=o, method=method))(
        groups, origins, jnp.asarray(ks)
      )
    th, kept_sum, kept_sign = self._reference(groups, origins, ks)
    np.testing.assert_array_equal(stats.threshold, th)
    np.testing.assert_allclose(stats.kept_sum, kept_sum, rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(stats.kept_sign_sum, kept_sign)

  def test_host_bracket_failure_falls_back_exactly(self):
    # The strided sample sees only the 10s, so its bracket keeps n/4 < k entries: the fallback
    # must still find the exact k-th magnitude (1.0).
    x = np.ones(65_536 * 4, np.float32)
    x[::4] = 10.0
    th, kept_sum, _ = selection._host_group_stats([x], None, x.size // 2)
    self.assertEqual(th, 1.0)
    self.assertEqual(kept_sum, x.sum())

  def test_host_groups_in_threads_flush_subnormals_as_xla_does(self):
    # Inside jit the groups run in threads that the callback starts: they must inherit XLA's
    # floating-point mode (subnormals flushed to zero), as the callback's own thread does.
    rng = np.random.default_rng(4)
    groups = [[(rng.standard_normal(1000) * 1e-39).astype(np.float32)] for _ in range(3)]
    origins = [[np.zeros(1000, np.float32)]] * 3
    ks = jnp.asarray([10, 10, 10])
    stats = {
      m: jax.jit(lambda g, o, k, m=m: selection.top_k_stats(g, k, origins=o, method=m))(
        groups, origins, ks
      )
      for m in ("host", "bisect")
    }
    np.testing.assert_array_equal(stats["host"].threshold, stats["bisect"].threshold)
    np.testing.assert_array_equal(stats["host"].threshold, [0.0, 0.0, 0.0])
    # NumPy outside XLA keeps the subnormals: the flush is exercised.
    self.assertGreater(selection._host_group_stats(groups[0], origins[0], 10)[0], 0.0)
