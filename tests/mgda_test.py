"""Tests for mergejax.learned.mgda against hand-worked min-norm solutions."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from mergejax.learned import mgda


class MinNormTest(chex.TestCase, parameterized.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    # ||a g1 + (1-a) g2||² with g1=(2,0), g2=(0,1): 4a² + (1-a)², minimal at a = 1/5.
    ("unequal_orthogonal", [[2.0, 0.0], [0.0, 1.0]], [0.2, 0.8], [0.4, 0.8]),
    # Equal-norm orthogonal: the midpoint.
    ("equal_orthogonal", [[1.0, 0.0], [0.0, 1.0]], [0.5, 0.5], [0.5, 0.5]),
    # g1=(1,0), g2=(1,1): (1, 1-a) is shortest at a = 1, a vertex of the simplex.
    ("vertex", [[1.0, 0.0], [1.0, 1.0]], [1.0, 0.0], [1.0, 0.0]),
    # Opposite gradients: the zero vector is in the hull (Pareto-stationary).
    ("opposite", [[1.0, 0.0], [-3.0, 0.0]], [0.75, 0.25], [0.0, 0.0]),
  )
  def test_two_vectors(self, grads, alpha, direction):
    combine = self.variant(mgda.min_norm_combination)
    got_direction, got_alpha = combine(jnp.array(grads))
    np.testing.assert_allclose(got_alpha, alpha, atol=1e-6)
    np.testing.assert_allclose(got_direction, direction, atol=1e-6)

  def test_three_orthonormal_vectors_give_uniform_weights(self):
    _, alpha = mgda.min_norm_combination(jnp.eye(3), num_iterations=500)
    np.testing.assert_allclose(alpha, [1 / 3] * 3, atol=1e-3)

  def test_matches_brute_force_on_random_gradients(self):
    grads = jax.random.normal(jax.random.key(0), (3, 5))
    _, alpha = mgda.min_norm_combination(grads, num_iterations=1000)
    best = np.inf
    g = np.asarray(grads, np.float64)
    for a in np.linspace(0, 1, 201):
      for b in np.linspace(0, 1 - a, max(2, int(round((1 - a) * 200)) + 1)):
        best = min(best, np.sum((a * g[0] + b * g[1] + (1 - a - b) * g[2]) ** 2))
    got = np.sum(np.asarray(alpha, np.float64) @ g * (np.asarray(alpha, np.float64) @ g))
    self.assertLessEqual(got, best + 1e-4)
    np.testing.assert_allclose(np.sum(alpha), 1.0, atol=1e-6)
    self.assertTrue(np.all(np.asarray(alpha) >= 0))

  def test_sequence_input_and_trailing_shape(self):
    grads = [jnp.ones((2, 2)), -jnp.ones((2, 2))]
    direction, alpha = mgda.min_norm_combination(grads)
    self.assertEqual(direction.shape, (2, 2))
    np.testing.assert_allclose(alpha, [0.5, 0.5], atol=1e-6)


if __name__ == "__main__":
  absltest.main()
