"""Tests for mergejax.learned.parametrizations: blocks, blockwise scaling, clamps, plug-ins."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from mergejax import rules
from mergejax.learned import parametrizations as coefficients


def _tree(value, dtype=jnp.float32):
  return {
    "enc": {
      "dense": {"kernel": jnp.full((2, 3), value, dtype), "bias": jnp.full((3,), value, dtype)}
    },
    "out": {"kernel": jnp.full((3, 1), value, dtype)},
  }


class BlocksTest(parameterized.TestCase):
  def test_task_granularity_is_one_block(self):
    blocks = coefficients.make_blocks(_tree(0.0), granularity="task")
    self.assertEqual(blocks.names, ("all",))
    self.assertEqual(blocks.leaf_block, (0, 0, 0))

  def test_layer_granularity_is_one_block_per_leaf(self):
    blocks = coefficients.make_blocks(_tree(0.0), granularity="layer")
    self.assertEqual(blocks.names, ("enc/dense/bias", "enc/dense/kernel", "out/kernel"))
    self.assertEqual(blocks.leaf_block, (0, 1, 2))

  def test_patterns_fully_match_first_match_wins_and_rest_block(self):
    blocks = coefficients.make_blocks(
      _tree(0.0), granularity="patterns", patterns=(".*kernel", "enc/.*")
    )
    # bias matches only "enc/.*", the two kernels match ".*kernel" first; nothing is left over.
    self.assertEqual(blocks.names, (".*kernel", "enc/.*"))
    self.assertEqual(blocks.leaf_block, (1, 0, 0))
    blocks = coefficients.make_blocks(_tree(0.0), granularity="patterns", patterns=("enc/.*",))
    self.assertEqual(blocks.names, ("enc/.*", coefficients.REST))
    self.assertEqual(blocks.leaf_block, (0, 0, 1))
    # Patterns match whole paths (re.fullmatch, as everywhere in mergejax): a bare "kernel"
    # matches no path and is reported.
    with self.assertRaisesRegex(ValueError, "whole leaf path"):
      coefficients.make_blocks(_tree(0.0), granularity="patterns", patterns=("kernel",))

  @parameterized.named_parameters(
    ("unused_pattern", dict(granularity="patterns", patterns=("nope",))),
    ("no_patterns", dict(granularity="patterns")),
    ("bad_granularity", dict(granularity="row")),
  )
  def test_bad_block_specs_raise(self, kwargs):
    with self.assertRaises(ValueError):
      coefficients.make_blocks(_tree(0.0), **kwargs)


class MergeTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_layerwise_matches_hand_computation(self):
    base = _tree(1.0)
    basis = [_tree(2.0), _tree(-1.0)]
    blocks = coefficients.make_blocks(base, granularity="layer")
    # Blocks: bias, kernel, out/kernel.
    coeffs = jnp.array([[0.5, 0.0, 1.0], [1.0, 2.0, 0.25]], jnp.float32)
    merge = self.variant(coefficients.blockwise_scaling(blocks).merge)
    out = merge(coeffs, base, basis)
    np.testing.assert_allclose(out["enc"]["dense"]["bias"], 1.0 + 0.5 * 2 - 1.0 * 1)
    np.testing.assert_allclose(out["enc"]["dense"]["kernel"], 1.0 + 0.0 * 2 - 2.0 * 1)
    np.testing.assert_allclose(out["out"]["kernel"], 1.0 + 1.0 * 2 - 0.25 * 1)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, base)

  def test_taskwise_equals_task_arithmetic(self):
    base = jax.tree.map(lambda x: x + jnp.arange(x.size).reshape(x.shape) * 0.1, _tree(0.3))
    experts = [jax.tree.map(lambda x, s=s: x * s, base) for s in (1.5, -0.5, 2.0)]
    vectors = [jax.tree.map(jnp.subtract, e, base) for e in experts]
    blocks = coefficients.make_blocks(base, granularity="task")
    scaling = coefficients.blockwise_scaling(blocks, init=0.3)
    out = scaling.merge(scaling.init(base, vectors), base, vectors)
    expected = rules.merge("task_arithmetic", base, experts, scale=0.3)
    chex.assert_trees_all_close(out, expected, atol=1e-6)

  def test_bf16_base_keeps_dtype_and_sums_in_fp32(self):
    base = _tree(256.0, jnp.bfloat16)
    basis = [_tree(1.0, jnp.bfloat16)] * 4
    blocks = coefficients.make_blocks(base, granularity="task")
    coeffs = jnp.full((4, 1), 0.5)  # Each term alone (0.5) is below bf16's spacing at 256 (2.0).
    out = coefficients.merge_blockwise(coeffs, base, basis, blocks)
    chex.assert_trees_all_equal_dtypes(out, base)
    np.testing.assert_array_equal(np.asarray(out["out"]["kernel"], np.float32), 258.0)

  def test_wrong_coefficient_shape_raises(self):
    base = _tree(0.0)
    blocks = coefficients.make_blocks(base, granularity="layer")
    with self.assertRaisesRegex(ValueError, "expected"):
      coefficients.merge_blockwise(jnp.zeros((1, 1)), base, [base], blocks)

  def test_init_and_clamp(self):
    blocks = coefficients.make_blocks(_tree(0.0), granularity="layer")
    coeffs = coefficients.blockwise_scaling(blocks, init=0.3).init(_tree(0.0), [_tree(1.0)] * 2)
    self.assertEqual(coeffs.shape, (2, 3))
    self.assertEqual(coeffs.dtype, jnp.float32)
    clamped = coefficients.clamp_coefficients(jnp.array([-1.0, 0.5, 2.0]), (0.0, 1.0))
    np.testing.assert_array_equal(clamped, [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(
      coefficients.clamp_coefficients(jnp.array([-1.0, 2.0]), ()), [-1.0, 2.0]
    )
    with self.assertRaises(ValueError):
      coefficients.blockwise_scaling(blocks, clamp=(0.0, 1.0), clamp_mode="squash")


if __name__ == "__main__":
  absltest.main()
