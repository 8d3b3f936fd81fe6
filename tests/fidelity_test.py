"""Issue 10 (fidelity to the reference code and to mergekit) and issue 12's per-expert weights.

Hand-worked numbers and NumPy references written here (mergekit's generalized task arithmetic,
EMR's official rescaler); the element-for-element check against mergekit itself is
launch/check_mergekit.py (outside the tests).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from configs import breadcrumbs_mergekit, dare_ties_mergekit, merge, ties_mergekit
from mergejax import rules, run, selection, sparsify


def _vec(*values):
  return {"w": jnp.asarray(values, jnp.float32)}


def _zeros_like(tree):
  return jax.tree.map(jnp.zeros_like, tree)


def _np_topk_mask(x, k):
  """Exactly the k largest |x| (mergekit's argsort; no ties in the test data)."""
  flat = np.abs(x).ravel()
  mask = np.zeros(flat.size, bool)
  mask[np.argsort(-flat, kind="stable")[:k]] = True
  return mask.reshape(x.shape)


def _np_mergekit_gta(deltas, weights, *, consensus, normalize, lam=1.0):
  """mergekit's GeneralizedTaskArithmeticMerge on one tensor, from sparsified deltas [T, ...]."""
  w = np.asarray(weights, np.float64).reshape((-1,) + (1,) * (deltas.ndim - 1))
  weighted = deltas * w
  if consensus:
    majority = np.where(weighted.sum(0) >= 0, 1.0, -1.0)
    mask = np.sign(weighted) == majority
    mixed = (weighted * mask).sum(0)
    divisor = (w * mask).sum(0)
    divisor[divisor == 0] = 1.0
  else:
    mixed = weighted.sum(0)
    divisor = np.broadcast_to(w.sum(0), mixed.shape).copy()
    divisor[np.abs(divisor) < 1e-8] = 1.0
  if normalize:
    mixed = mixed / divisor
  return lam * mixed


def _random_model(seed):
  rng = np.random.default_rng(seed)
  return {
    "attn": {"weight": rng.standard_normal((6, 7)).astype(np.float32)},
    "attn_bias": rng.standard_normal((7,)).astype(np.float32),
    "norm": rng.standard_normal((3,)).astype(np.float32),
  }


BASE = _random_model(0)
EXPERTS = [_random_model(s) for s in (1, 2, 3)]
WEIGHTS = (1.0, 0.6, 0.3)


def _leaf_deltas():
  out = {}
  for path in ("attn/weight", "attn_bias", "norm"):
    get = (
      (lambda t, p=path: t["attn"]["weight"]) if path == "attn/weight" else (lambda t, p=path: t[p])
    )
    out[path] = (get, np.stack([get(e).astype(np.float64) - get(BASE) for e in EXPERTS]))
  return out


class CountingTest(parameterized.TestCase):
  @parameterized.parameters(
    # (size, fraction, rounding, expected): fractional d·n, below 1, float32-unfriendly 0.7·10.
    (10, 0.7, "floor", 7),
    (10, 0.7, "floor_min1", 7),
    (3, 0.2, "floor", 0),
    (3, 0.2, "floor_min1", 1),
    (3, 0.2, "round", 1),
    (7, 0.5, "floor", 3),
    (7, 0.5, "round", 4),
    (100, 0.01, "floor", 1),
  )
  def test_count_for_fraction_concrete_and_traced(self, size, fraction, rounding, expected):
    self.assertEqual(int(selection.count_for_fraction(size, fraction, rounding)), expected)
    traced = jax.jit(lambda f: selection.count_for_fraction(size, f, rounding))
    self.assertEqual(int(traced(jnp.float32(fraction))), expected)

  def test_ties_mergekit_counting_keeps_one_below_one(self):
    # d·n = 0.6 on a 3-entry leaf: mergekit keeps max(1, int(0.6)) = 1; d·n = 3.5 on 7 entries:
    # int() keeps 3, round() keeps 4.
    tree = {"a": jnp.array([1.0, -3.0, 2.0]), "b": jnp.arange(1.0, 8.0)}
    out = rules.ties_merging(
      _zeros_like(tree), [tree], density=0.2, trim_scope="leaf", counting="mergekit"
    )
    np.testing.assert_array_equal(out["a"], [0.0, -3.0, 0.0])
    out = rules.ties_merging(
      _zeros_like(tree), [tree], density=0.5, trim_scope="leaf", counting="mergekit"
    )
    np.testing.assert_array_equal(out["b"], [0, 0, 0, 0, 5.0, 6.0, 7.0])
    out = rules.merge("ties", _zeros_like(tree), [tree], density=0.5, trim_scope="leaf")
    np.testing.assert_array_equal(out["b"], [0, 0, 0, 4.0, 5.0, 6.0, 7.0])


class OrientationTest(parameterized.TestCase):
  # A torch weight [out=2, in=3] and the same weight as a flax kernel [in=3, out=2].
  W = np.array([[1.0, 5.0, 3.0], [2.0, 6.0, 4.0]], np.float32)

  @parameterized.parameters("torch", "flax")
  def test_breadcrumbs_rows_are_output_neurons(self, layout):
    # Per output neuron (row of W): m = 3, gamma 0.34 -> int(1.02) = 1 outlier, density 0.34 ->
    # int(1.02) = 1 kept: row [1, 5, 3] keeps 3, row [2, 6, 4] keeps 4.
    x = self.W if layout == "torch" else self.W.T
    out = rules.breadcrumbs(
      {"w": jnp.zeros_like(x)}, [{"w": x}], density=0.34, gamma=0.34, scale=1.0, layout=layout
    )["w"]
    expected = np.array([[0, 0, 3.0], [0, 0, 4.0]])
    np.testing.assert_array_equal(out, expected if layout == "torch" else expected.T)

  def test_breadcrumbs_per_input_unit_would_differ(self):
    # The old orientation (rows along the last axis of a flax kernel = per input unit).
    out = rules.breadcrumbs(
      {"w": jnp.zeros((3, 2))}, [{"w": self.W.T}], density=0.5, gamma=0.0, scale=1.0, layout="torch"
    )["w"]
    self.assertFalse(np.array_equal(out, np.array([[0, 0, 3.0], [0, 0, 4.0]]).T))

  @parameterized.parameters("torch", "flax")
  def test_della_ranks_per_output_neuron(self, layout):
    # density 0.5, epsilon 0.5: the smallest entry of a row is kept with p ~ 0, the largest with
    # p = 1 (and divided by 1), the middle with p = 0.5. Only the largest per output neuron is
    # sure to survive: 5 in row [1, 5, 3]... with m = 3 the middle has p = 0.5, so use m = 2.
    w = np.array([[1.0, 5.0], [2.0, 6.0]], np.float32)  # [out, in]
    x = w if layout == "torch" else w.T
    out = rules.della(
      {"w": jnp.zeros_like(x)},
      [{"w": x}],
      key=jax.random.key(0),
      density=0.5,
      epsilon=0.5,
      scale=1.0,
      combine="sum",
      layout=layout,
    )["w"]
    expected = np.array([[0, 5.0], [0, 6.0]])  # Per input unit it would be [[0, 0], [2, 6]].
    np.testing.assert_array_equal(out, expected if layout == "torch" else expected.T)

  def test_breadcrumbs_reference_counts_and_small_leaves(self):
    tau = {
      "w": jnp.array([[10.0, 1.0, 2.0, 3.0, 4.0], [5.0, 4.0, 3.0, 2.0, 1.0]]),  # torch [2, 5]
      "b": jnp.array([1.0, 4.0, 2.0, 3.0, 5.0]),
      "s": jnp.array(7.0),
    }
    # m = 5: density 0.7 -> int(3.5) = 3 kept (round would keep 4), gamma 0.2 -> 1 outlier.
    out = rules.breadcrumbs(
      _zeros_like(tau), [tau], density=0.7, gamma=0.2, scale=1.0, layout="torch"
    )
    np.testing.assert_array_equal(out["w"], [[0, 0, 2.0, 3.0, 4.0], [0, 4.0, 3.0, 2.0, 0]])
    np.testing.assert_array_equal(out["b"], [0, 4.0, 2.0, 3.0, 0])  # 1-D: the whole leaf.
    np.testing.assert_array_equal(out["s"], 7.0)  # 0-D: untouched, as the reference.
    # density 0.15: int(0.75) = 0 keeps nothing (reference); "round" keeps one.
    out = rules.breadcrumbs(_zeros_like(tau), [tau], density=0.15, gamma=0.0, scale=1.0)
    np.testing.assert_array_equal(out["b"], np.zeros(5))
    out = rules.breadcrumbs(
      _zeros_like(tau), [tau], density=0.15, gamma=0.0, scale=1.0, counting="round"
    )
    np.testing.assert_array_equal(out["b"], [0, 0, 0, 0, 5.0])

  def test_breadcrumbs_mergekit_counting(self):
    tau = {"w": jnp.arange(1.0, 11.0)}
    # n_keep = int(9.5) = 9, n_top = int(2.0) = 2 do not fit in 10: mergekit drops 1 outlier.
    out = rules.breadcrumbs(
      _zeros_like(tau), [tau], density=0.95, gamma=0.2, scale=1.0, counting="mergekit"
    )
    np.testing.assert_array_equal(out["w"], np.r_[np.arange(1.0, 10.0), 0.0])
    out = rules.breadcrumbs(_zeros_like(tau), [tau], density=0.95, gamma=0.2, scale=1.0)
    np.testing.assert_array_equal(out["w"], np.r_[np.arange(1.0, 9.0), 0.0, 0.0])
    out = rules.breadcrumbs(
      _zeros_like(tau), [tau], density=1.0, gamma=0.2, scale=1.0, counting="mergekit"
    )
    np.testing.assert_array_equal(out["w"], tau["w"])  # density 1: untouched.

  def test_layout_of_checkpoints(self):
    self.assertEqual(
      run.weight_layout({"dense": {"kernel": jnp.ones((2, 3))}}, "safetensors"), "flax"
    )
    self.assertEqual(run.weight_layout({"fc.weight": jnp.ones((3, 2))}, "hf"), "torch")
    self.assertEqual(run.weight_layout({"fc.weight": jnp.ones((3, 2))}, "orbax"), "flax")
    self.assertEqual(merge.get_config("breadcrumbs").rule.layout, "auto")
    self.assertEqual(merge.get_config("della").rule.layout, "auto")


class FromDiskTest(absltest.TestCase):
  def test_torch_named_safetensors_rank_per_output_neuron(self):
    # A torch-named weight [out=2, in=3] on disk: "auto" resolves to "torch", so the rows are the
    # output neurons (flax's reading would rank its columns, i.e. per input unit).
    import tempfile

    from mergejax.io import checkpoint

    tmp = tempfile.mkdtemp()
    w = OrientationTest.W
    checkpoint.save_params(f"{tmp}/base.safetensors", {"fc": {"weight": np.zeros_like(w)}})
    checkpoint.save_params(f"{tmp}/e.safetensors", {"fc": {"weight": w}})
    config = merge.get_config("breadcrumbs")
    config.base, config.experts = f"{tmp}/base.safetensors", (f"{tmp}/e.safetensors",)
    config.rule.update(density=0.34, gamma=0.34, scale=1.0)
    record = run.merge_from_disk(config, f"{tmp}/work")
    out = checkpoint.load_params(record["outputs"][0])
    leaf = np.asarray(jax.tree.leaves(out)[0])
    np.testing.assert_array_equal(leaf, [[0, 0, 3.0], [0, 0, 4.0]])


class DefaultsTest(absltest.TestCase):
  def test_della_official_example(self):
    h = rules.hparams_of("della")
    self.assertEqual((h["density"], h["epsilon"], h["scale"]), (0.7, 0.07, 1.1))
    self.assertEqual((h["scope"], h["layout"], h["combine"]), ("row", "flax", "ties"))

  def test_breadcrumbs_reference(self):
    h = rules.hparams_of("breadcrumbs")
    self.assertEqual((h["scope"], h["counting"]), ("row", "floor"))

  def test_della_keep_probabilities_span_the_window(self):
    # Window 0.14 around 0.7: ranks get p from 0.63 (smallest) to 0.77 (largest), unbiased.
    x = jnp.tile(jnp.linspace(0.01, 1.0, 50), (400, 1))  # 400 neurons of 50 inputs (torch).
    out = np.asarray(
      sparsify.della_drop([{"w": x}], jax.random.key(3), 0.7, 0.07, layout="torch")[0]["w"]
    )
    kept = (out != 0).mean(0)
    self.assertAlmostEqual(kept[0], 0.63, delta=0.06)
    self.assertAlmostEqual(kept[-1], 0.77, delta=0.06)
    np.testing.assert_allclose(out.mean(0), np.asarray(x[0]), rtol=0.2)


class DensityOneTest(absltest.TestCase):
  def test_reduce_to_task_arithmetic(self):
    ta = rules.task_arithmetic(BASE, EXPERTS, scale=1.0, weights=WEIGHTS)
    for layout in ("flax", "torch"):
      for counting in ("floor", "round", "mergekit"):
        out = rules.breadcrumbs(
          BASE,
          EXPERTS,
          density=1.0,
          gamma=0.0,
          scale=1.0,
          layout=layout,
          counting=counting,
          weights=WEIGHTS,
        )
        chex.assert_trees_all_close(out, ta, atol=1e-6)
    out = rules.dare(BASE, EXPERTS, key=jax.random.key(0), density=1.0, weights=WEIGHTS)
    chex.assert_trees_all_close(out, ta, atol=1e-6)


class ConsensusTiesTest(absltest.TestCase):
  TAUS = [_vec(4.0, -1.0, 0.5, -3.0), _vec(-2.0, 3.0, 0.2, -2.5)]

  def test_reference(self):
    # TIES (top 2 of 4): [4,0,0,-3], [0,3,0,-2.5]; mass [4,3,0,-5.5], zero -> sgn(1.5) = +;
    # disjoint sum tau_TIES = [4, 3, 0, -5.5]. TALL (lambda .5) against it, original tau_t:
    # m1 = [T,F,T,T], m2 = [F,T,T,T]; >= 2 masks: [F,F,T,T] -> [0, 0, 0, -5.5].
    out = rules.consensus(
      _vec(0, 0, 0, 0), self.TAUS, tall_lambda=0.5, scale=1.0, combine="ties", density=0.5
    )
    np.testing.assert_array_equal(out["w"], [0, 0, 0, -5.5])

  def test_untrimmed_option_is_the_old_behaviour(self):
    # Disjoint mean of untrimmed tau: [4, 3, .35, -2.75]; masks against sum [2, 2, .7, -5.5]:
    # m1 = [T,F,T,T], m2 = [T,T,F,T] -> [T,F,F,T].
    out = rules.consensus(
      _vec(0, 0, 0, 0), self.TAUS, tall_lambda=0.5, scale=1.0, combine="ties_untrimmed"
    )
    np.testing.assert_allclose(out["w"], [4.0, 0, 0, -2.75])

  def test_per_task_lambdas(self):
    # lambda_2 = 1: m2 = [F, T, T, F] -> consensus [F, F, T, F]; tau_TIES is 0 there.
    out = rules.merge(
      "consensus",
      _vec(0, 0, 0, 0),
      self.TAUS,
      tall_lambda=(0.5, 1.0),
      scale=1.0,
      density=0.5,
      combine="ties",
    )
    np.testing.assert_array_equal(out["w"], [0, 0, 0, 0])


class EMRTest(absltest.TestCase):
  def test_rescalers(self):
    taus = [
      {"a": jnp.array([2.0]), "b": jnp.array([1.0, 1.0, 1.0, 1.0])},
      {"a": jnp.array([-1.0]), "b": jnp.array([3.0, -1.0, 0.0, 1.0])},
    ]
    base = _zeros_like(taus[0])
    # NumPy: sign of sums a: +, b: [+, 0->fallback, +, +]; the fallback is sgn(total) = +.
    unified = {"a": np.array([2.0]), "b": np.array([3.0, 1.0, 1.0, 1.0])}
    masks = [
      {"a": np.array([True]), "b": np.array([True, True, True, True])},
      {"a": np.array([False]), "b": np.array([True, False, False, True])},
    ]
    for rescaler, reduce in (("tensor_mean", np.mean), ("paper", np.sum)):
      merged = rules.emr_merging(base, taus, rescaler=rescaler)
      for t in range(2):
        num = sum(reduce(np.abs(np.asarray(taus[t][k]))) for k in ("a", "b"))
        den = sum(reduce(np.abs(unified[k] * masks[t][k])) for k in ("a", "b"))
        np.testing.assert_allclose(merged.rescalers[t], num / den, rtol=1e-6)
    # The two differ here: 1-entry leaf a weighs as much as the 4-entry b under tensor_mean.
    a = rules.emr_merging(base, taus).rescalers
    b = rules.emr_merging(base, taus, rescaler="paper").rescalers
    self.assertFalse(np.allclose(a, b))
    self.assertEqual(rules.hparams_of("emr")["rescaler"], "tensor_mean")


class DareTiesTest(absltest.TestCase):
  def test_default_is_mergelm_dare_then_full_ties(self):
    # density 1: DARE keeps all (rescale 1), so DARE-TIES = TIES with its 20% trim.
    out = rules.dare_ties(BASE, EXPERTS, key=jax.random.key(0), density=1.0)
    chex.assert_trees_all_close(out, rules.ties_merging(BASE, EXPERTS, density=0.2), atol=1e-6)
    untrimmed = rules.dare_ties(
      BASE, EXPERTS, key=jax.random.key(0), density=1.0, trim_density=None
    )
    chex.assert_trees_all_close(
      untrimmed, rules.ties_merging(BASE, EXPERTS, density=1.0), atol=1e-6
    )

  def test_mergekit_option(self):
    # mergekit: no trim, L1 rescale (a no-op at density 1), weighted election, disjoint sum.
    config = dare_ties_mergekit.get_config()
    hparams = dict(config.rule.to_dict(), weights=WEIGHTS)
    out = rules.merge("dare_ties", BASE, EXPERTS, key=jax.random.key(0), **hparams)
    for path, (get, deltas) in _leaf_deltas().items():
      ref = get(BASE) + _np_mergekit_gta(deltas, WEIGHTS, consensus=True, normalize=False)
      np.testing.assert_allclose(get(out), ref, rtol=1e-5, atol=1e-6, err_msg=path)

  def test_mergekit_option_keeps_l1_below_density_one(self):
    tree = {"w": jnp.linspace(0.1, 2.0, 2000)}
    out = rules.dare_ties(
      _zeros_like(tree),
      [tree],
      key=jax.random.key(1),
      density=0.3,
      rescale="l1",
      reduce="sum",
      trim_density=None,
    )
    np.testing.assert_allclose(np.abs(out["w"]).sum(), np.abs(tree["w"]).sum(), rtol=1e-5)
    self.assertAlmostEqual(float((out["w"] != 0).mean()), 0.3, delta=0.04)


class WeightsTest(parameterized.TestCase):
  """Per-expert weights with mergekit's meaning, against a NumPy mergekit written above."""

  def _check(self, out, sparsified, weights, **gta):
    for path, (get, deltas) in _leaf_deltas().items():
      ref = get(BASE) + _np_mergekit_gta(sparsified(path, deltas), weights, **gta)
      np.testing.assert_allclose(get(out), ref, rtol=1e-5, atol=1e-6, err_msg=path)

  @parameterized.parameters((WEIGHTS,), ((1.0, -0.5, 2.0),))
  def test_ties(self, weights):
    config = ties_mergekit.get_config()
    hparams = dict(config.rule.to_dict(), density=0.3, weights=weights)
    out = rules.merge("ties", BASE, EXPERTS, **hparams)

    def trim(path, deltas):
      k = max(1, int(0.3 * deltas[0].size))
      return np.stack([d * _np_topk_mask(d, k) for d in deltas])

    self._check(out, trim, weights, consensus=True, normalize=True)

  def test_breadcrumbs(self):
    config = breadcrumbs_mergekit.get_config()
    hparams = dict(config.rule.to_dict(), density=0.5, gamma=0.2, weights=WEIGHTS)
    hparams["layout"] = "torch"
    out = rules.merge("breadcrumbs", BASE, EXPERTS, **hparams)

    def outliers(path, deltas):
      n = deltas[0].size
      keep, top = int(0.5 * n), int(0.2 * n)
      bottom = max(0, n - keep - top)
      out = []
      for d in deltas:
        order = np.argsort(np.abs(d).ravel(), kind="stable")
        mask = np.zeros(n, bool)
        mask[order[bottom : bottom + keep]] = True
        out.append(d * mask.reshape(d.shape))
      return np.stack(out)

    self._check(out, outliers, WEIGHTS, consensus=False, normalize=False)

  def test_task_arithmetic_dare_della(self):
    keep = lambda path, deltas: deltas  # noqa: E731 (density 1: nothing dropped)
    out = rules.merge("task_arithmetic", BASE, EXPERTS, weights=WEIGHTS, scale=0.5)
    self._check(out, keep, WEIGHTS, consensus=False, normalize=False, lam=0.5)
    out = rules.dare(BASE, EXPERTS, key=jax.random.key(0), density=1.0, weights=WEIGHTS)
    self._check(out, keep, WEIGHTS, consensus=False, normalize=False)
    out = rules.dare(
      BASE, EXPERTS, key=jax.random.key(0), density=1.0, weights=WEIGHTS, combine="mean"
    )
    self._check(out, keep, WEIGHTS, consensus=False, normalize=True)
    out = rules.della(
      BASE, EXPERTS, key=jax.random.key(0), density=1.0, epsilon=0.0, scale=1.0, weights=WEIGHTS
    )
    self._check(out, keep, WEIGHTS, consensus=True, normalize=True)

  def test_unit_weights_change_nothing_and_sweeps_do_not_retrace(self):
    a = rules.ties_merging(BASE, EXPERTS, weights=(1.0, 1.0, 1.0))
    chex.assert_trees_all_close(a, rules.ties_merging(BASE, EXPERTS), atol=1e-6)
    fn = jax.jit(chex.assert_max_traces(rules.ties_merging, n=1))
    for w in ((1.0, 0.5, 0.2), (0.3, 0.3, 2.0)):
      fn(BASE, EXPERTS, weights=jnp.asarray(w, jnp.float32))

  def test_bad_weights_name_the_rule(self):
    with self.assertRaisesRegex(ValueError, "weights=.*expected 1 or 3"):
      rules.merge("ties", BASE, EXPERTS, weights=(1.0, 2.0))


if __name__ == "__main__":
  absltest.main()
