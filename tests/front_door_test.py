"""`rules.merge` as a hostile user meets it: patterns, non-float leaves, hyper-parameter types,
NaN/Inf in the inputs and in the result (issue 11, items 1-3 and 7)."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from mergejax import rules
from mergejax import tree as tree_lib
from mergejax.rules import front_door


def _models():
  base = {"head": {"w": jnp.zeros(2)}, "body": {"w": jnp.zeros(3)}}
  experts = [
    {"head": {"w": jnp.full(2, 1.0)}, "body": {"w": jnp.full(3, 2.0)}},
    {"head": {"w": jnp.full(2, 3.0)}, "body": {"w": jnp.full(3, 4.0)}},
  ]
  return base, experts


class PatternTest(parameterized.TestCase):
  def test_a_regex_with_a_comma_is_one_pattern(self):
    base, experts = _models()
    out = rules.merge("task_arithmetic", base, experts, exclude=[r"h.{1,3}/w"], scale=1.0)
    np.testing.assert_array_equal(out["head"]["w"], 0.0)  # Excluded: θ0's.
    np.testing.assert_array_equal(out["body"]["w"], 6.0)

  def test_several_patterns(self):
    base, experts = _models()
    out = rules.merge("task_arithmetic", base, experts, include=["head/w", "body/w"], scale=1.0)
    np.testing.assert_array_equal(out["head"]["w"], 4.0)

  @parameterized.parameters("include", "exclude")
  def test_a_pattern_matching_no_leaf_is_an_error(self, which):
    base, experts = _models()
    with self.assertRaisesRegex(
      ValueError, rf"{which} pattern 'haed/.\*' matches no leaf.*look alike: \['head/w'"
    ):
      rules.merge("task_arithmetic", base, experts, **{which: ["body/w", "haed/.*"]})

  def test_patterns_must_be_strings_and_regexes(self):
    base, experts = _models()
    with self.assertRaisesRegex(TypeError, "exclude: -9 is a int, not a regex string"):
      rules.merge("task_arithmetic", base, experts, exclude=[-9])
    with self.assertRaisesRegex(ValueError, r"include: 'body/\(' is not a valid regex"):
      rules.merge("task_arithmetic", base, experts, include="body/(")


class NonFloatTest(absltest.TestCase):
  def _models(self, expert_ids):
    ids = np.array([2**33 + 5, 7], np.int64)
    base = {"w": jnp.zeros(2), "ids": ids, "flag": np.array(True)}
    experts = [
      {"w": jnp.full(2, 1.0), "ids": np.asarray(e, np.int64), "flag": np.array(True)}
      for e in expert_ids
    ]
    return base, experts

  def test_equal_integer_leaves_are_copied_exactly(self):
    base, experts = self._models([[2**33 + 5, 7], [2**33 + 5, 7]])
    out = rules.merge("task_arithmetic", base, experts, scale=1.0)
    self.assertEqual(out["ids"].dtype, np.int64)
    self.assertEqual(int(out["ids"][0]), 2**33 + 5)  # Not narrowed to int32 (which gives 5).
    np.testing.assert_array_equal(out["w"], 2.0)
    self.assertEqual(out["flag"].dtype, np.bool_)

  def test_differing_integer_leaves_are_an_error(self):
    base = {"w": jnp.zeros(5), "n": np.arange(5)}
    experts = [{"w": jnp.ones(5), "n": np.arange(5) * 2}]
    with self.assertRaisesRegex(ValueError, r"Leaf 'n' \(int64\) differs between base and expe"):
      rules.merge("task_arithmetic", base, experts)
    out = rules.merge("task_arithmetic", base, experts, non_float="base")
    np.testing.assert_array_equal(out["n"], np.arange(5))  # Never [0 1 3 5 7].

  def test_task_specific_rules_copy_them_too(self):
    base, experts = self._models([[2**33 + 5, 7], [2**33 + 5, 7]])
    merged = rules.merge("emr", base, experts)
    model = rules.emr_task_model(base, merged, 1)
    self.assertEqual(int(model["ids"][0]), 2**33 + 5)

  def test_float64_leaves_keep_their_dtype(self):
    base = {"w": np.zeros(2, np.float64)}
    out = rules.merge("task_arithmetic", base, [{"w": np.ones(2, np.float64)}], scale=0.5)
    self.assertEqual(out["w"].dtype, np.float64)
    np.testing.assert_array_equal(out["w"], 0.5)


class HParamTest(parameterized.TestCase):
  @parameterized.parameters(
    ("ties", dict(density="1.5"), TypeError, "is a str"),
    ("dare", dict(density="0"), TypeError, "is a str"),
    ("ties", dict(density=True), TypeError, "is a bool"),
    ("dare", dict(density=0), ValueError, r"outside \(0, 1\]"),
    ("task_arithmetic", dict(scale=1e39), ValueError, "overflows float32"),
    ("weight_average", dict(weights=[1.0, -1.0]), ValueError, r"outside \[0, inf\]"),
  )
  def test_bad_values(self, rule, hparams, error, message):
    base, experts = _models()
    kw = rules.add_key(rule, hparams, 0)
    with self.assertRaisesRegex(error, message):
      rules.merge(rule, base, experts, **kw)


class FiniteTest(parameterized.TestCase):
  def test_an_overflowing_result_names_the_leaf(self):
    base, experts = _models()
    experts[0]["body"]["w"] = jnp.full(3, 1e30)
    with self.assertRaisesRegex(
      ValueError, r"Leaf 'body/w' of the merged model holds 3 NaN/Inf.*hyper-parameters"
    ):
      rules.merge("task_arithmetic", base, experts, scale=1e10)

  @parameterized.parameters("task_arithmetic", "ties", "dare", "emr", "model_stock")
  def test_a_nan_input_names_the_leaf_and_the_expert(self, rule):
    base, experts = _models()
    experts[1]["body"]["w"] = experts[1]["body"]["w"].at[1].set(jnp.inf)
    with self.assertRaisesRegex(ValueError, r"Leaf 'body/w' of experts\[1\] holds 1 NaN/Inf"):
      rules.merge(rule, base, experts, **rules.add_key(rule, {}, 0))

  @parameterized.parameters(*sorted(n for n, r in rules.REGISTRY.items() if not r.data_dependent))
  def test_a_nan_in_a_large_leaf_names_the_leaf_and_the_expert(self, rule):
    # XLA on the CPU drops NaNs from max reductions of a few thousand entries or more: the
    # fused check reduces isfinite instead (8192 and 100000 entries).
    rng = np.random.default_rng(0)
    base = {"w": rng.standard_normal((64, 128)), "b": rng.standard_normal(100_000)}
    base = {k: v.astype(np.float32) for k, v in base.items()}
    experts = [{k: v + np.float32(0.01 * (t + 1)) for k, v in base.items()} for t in range(3)]
    experts = experts[1:] if rule == "slerp" else experts  # Two experts; the NaN in the last.
    for leaf, index in (("w", (40, 100)), ("b", 77_777)):
      bad = [dict(e) for e in experts]
      bad[-1][leaf] = bad[-1][leaf].copy()
      bad[-1][leaf][index] = np.nan
      last = len(bad) - 1
      with self.assertRaisesRegex(ValueError, rf"Leaf '{leaf}' of experts\[{last}\] holds 1 NaN"):
        rules.merge(rule, base, bad, **rules.add_key(rule, {}, 0))

  def test_the_fused_report_flags_nan_and_inf_in_large_leaves(self):
    x = np.ones(10_000, np.float32)
    x[5000] = np.nan
    y = np.full(9000, -3.0, np.float32)
    y[8000] = -np.inf
    report = jax.jit(front_door._finite_report)({"x": x, "y": y, "z": -np.arange(9e3)})
    np.testing.assert_array_equal(report, [np.nan, np.nan, 0.0])
    empty = jax.jit(front_door._finite_report)({"e": np.zeros((1, 0), np.float32)})
    np.testing.assert_array_equal(empty, [0.0])

  def test_unmerged_leaves_are_checked_too(self):
    base, experts = _models()
    base["head"]["w"] = jnp.array([0.0, jnp.nan])
    with self.assertRaisesRegex(ValueError, r"Leaf 'head/w' of base holds 1 NaN/Inf"):
      rules.merge("task_arithmetic", base, experts, exclude="head/.*")

  def test_no_second_pass_when_all_is_finite(self):
    # The checks ride in the merge's own jitted call: the host-side check never runs.
    base, experts = _models()
    original = tree_lib.check_finite
    tree_lib.check_finite = lambda *a, **k: self.fail("a second pass over the inputs")
    try:
      for rule in ("task_arithmetic", "ties", "emr"):
        rules.merge(rule, base, experts)
    finally:
      tree_lib.check_finite = original

  def test_check_finite_false_skips_them(self):
    base, experts = _models()
    experts[0]["body"]["w"] = jnp.full(3, jnp.nan)
    out = rules.merge("task_arithmetic", base, experts, check_finite=False)
    self.assertTrue(np.isnan(out["body"]["w"]).all())


class DtypeTest(absltest.TestCase):
  def test_the_suggested_cast_fits_the_base(self):
    base = {"w": jnp.zeros(2, jnp.float16)}
    with self.assertRaisesRegex(ValueError, r"astype\(jnp.float16\).*--config.cast_experts=True"):
      rules.merge("task_arithmetic", base, [{"w": jnp.zeros(2, jnp.float32)}])


if __name__ == "__main__":
  absltest.main()
