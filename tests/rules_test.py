"""Data-free merge rules: hand-worked numbers, properties, jit/no-jit agreement, no retracing."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from mergejax import rules, sparsify
from mergejax import task_vectors as tv
from mergejax.rules import spec


def _vec(*values):
  return {"w": jnp.asarray(values, jnp.float32)}


def _zeros(n):
  return {"w": jnp.zeros((n,), jnp.float32)}


def _random_tree(seed, dtype=jnp.float32):
  k = jax.random.key(seed)
  return {
    "enc": {
      "kernel": jax.random.normal(jax.random.fold_in(k, 0), (6, 4)).astype(dtype),
      "bias": jax.random.normal(jax.random.fold_in(k, 1), (4,)).astype(dtype),
    },
    "scalar": jax.random.normal(jax.random.fold_in(k, 2), ()).astype(dtype),
    "tiny": jax.random.normal(jax.random.fold_in(k, 3), (1,)).astype(dtype),
  }


def _kwargs(name, **overrides):
  kw = {"key": jax.random.key(0)} if "key" in rules.hparams_of(name) else {}
  kw.update(overrides)
  return kw


# Three task vectors whose TIES result is worked out by hand in the tests below (density 0.5).
TIES_TAUS = [_vec(4.0, -1.0, 0.5, -3.0), _vec(-2.0, 3.0, 0.2, -2.5), _vec(1.0, -5.0, 0.1, 2.0)]


class HandWorkedTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_task_arithmetic(self):
    fn = self.variant(rules.task_arithmetic)
    out = fn(_vec(1.0, 1.0), [_vec(2.0, 3.0), _vec(4.0, 0.0)], scale=0.5)
    chex.assert_trees_all_close(out, _vec(3.0, 1.5))

  @chex.variants(with_jit=True, without_jit=True)
  def test_task_negation(self):
    out = self.variant(rules.task_negation)(_vec(1.0, 1.0), [_vec(2.0, 3.0)], scale=0.5)
    chex.assert_trees_all_close(out, _vec(0.5, 0.0))

  @chex.variants(with_jit=True, without_jit=True)
  def test_weight_average(self):
    fn = self.variant(rules.weight_average)
    out = fn(_zeros(2), [_vec(1.0, 0.0), _vec(5.0, 4.0)], weights=jnp.array([1.0, 3.0]))
    chex.assert_trees_all_close(out, _vec(4.0, 3.0))
    chex.assert_trees_all_close(fn(_zeros(2), [_vec(1.0, 0.0), _vec(5.0, 4.0)]), _vec(3.0, 2.0))

  # Trim (top 2 of 4 per task): [4,0,0,-3], [0,3,0,-2.5], [0,-5,0,2]. Mass sum [4,-2,0,-3.5]:
  # signs [+,-,?,-], and the zero sum takes sgn(total = -1.5) = -. Agreeing entries:
  # e0 {4}, e1 {-5}, e2 {}, e3 {-3, -2.5}.
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    ("mean", "mean", (4.0, -5.0, 0.0, -2.75)),
    ("sum", "sum", (4.0, -5.0, 0.0, -5.5)),
    ("max", "max", (4.0, -5.0, 0.0, -3.0)),
  )
  def test_ties(self, reduce, expected):
    fn = self.variant(rules.ties_merging, static_argnames=("reduce",))
    out = fn(_zeros(4), TIES_TAUS, density=0.5, scale=1.0, reduce=reduce)
    chex.assert_trees_all_close(out, _vec(*expected))

  @chex.variants(with_jit=True, without_jit=True)
  def test_ties_count_election(self):
    # Count signs of e1: (0, +, -) -> 0; fallback sgn(sum of counts = 1 + 0 + 0 - 1 = 0) -> +.
    fn = self.variant(rules.ties_merging, static_argnames=("election",))
    out = fn(_zeros(4), TIES_TAUS, density=0.5, scale=2.0, election="count")
    chex.assert_trees_all_close(out, _vec(8.0, 6.0, 0.0, -5.5))

  def test_ties_leaf_scope_differs_from_model_scope(self):
    base = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
    expert = {"a": jnp.array([10.0, 9.0]), "b": jnp.array([1.0, 2.0])}
    model = rules.ties_merging(base, [expert], density=0.5, trim_scope="model")
    leaf = rules.ties_merging(base, [expert], density=0.5, trim_scope="leaf")
    chex.assert_trees_all_close(model, {"a": jnp.array([10.0, 9.0]), "b": jnp.zeros(2)})
    chex.assert_trees_all_close(leaf, {"a": jnp.array([10.0, 0.0]), "b": jnp.array([0.0, 2.0])})

  @chex.variants(with_jit=True, without_jit=True)
  def test_breadcrumbs(self):
    tau = _vec(10.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0)
    fn = self.variant(rules.breadcrumbs)
    # gamma 0.1 drops the top 1 (10); density 0.3 keeps the next 3 (9, 8, 7).
    out = fn(_zeros(10), [tau], density=0.3, gamma=0.1, scale=1.0)
    chex.assert_trees_all_close(out, _vec(0, 0, 0, 0, 0, 0, 0, 7.0, 8.0, 9.0))
    # gamma * n < 1 drops no outlier (as mergekit 0.1.5; older mergekit zeroed the whole leaf).
    out = fn(_zeros(10), [tau], density=0.3, gamma=0.05, scale=2.0)
    chex.assert_trees_all_close(out, _vec(20.0, 0, 0, 0, 0, 0, 0, 0, 16.0, 18.0))

  def test_breadcrumbs_rows(self):
    tau = {"w": jnp.array([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 30.0, 4.0]])}
    out = rules.breadcrumbs(
      {"w": jnp.zeros((2, 4))}, [tau], density=0.5, gamma=0.25, scale=1.0, layout="torch"
    )
    chex.assert_trees_all_close(out, {"w": jnp.array([[0, 3.0, 2.0, 0], [0, 2.0, 0, 4.0]])})

  def test_breadcrumbs_thresholds_from_the_inputs_give_the_same_masks(self):
    """`rules.breadcrumbs` hands the row sorts the stored inputs (bf16 here), not float32 |τ|:
    the same bits as masking the task vectors alone, for every scope, layout and leaf kind."""
    rng = np.random.default_rng(3)
    shapes = {"w": (6, 40), "b": (40,), "conv": (3, 4, 40), "s": (), "steps": (5,)}
    base = {k: rng.standard_normal(v).astype(jnp.bfloat16) for k, v in shapes.items()}
    base["steps"] = np.arange(5, dtype=np.int32)  # Not floating: falls back to the vectors.
    experts = []
    for _ in range(3):
      e = {k: (np.asarray(v, np.float32) + rng.normal(0, 0.1, np.shape(v))).astype(v.dtype)
           for k, v in base.items()}  # fmt: skip
      e["w"][0, :8] = base["w"][0, :8]  # Ties at zero.
      experts.append(e)
    vectors = tv.task_vectors(base, experts)
    for scope, layout, counting in [("row", "flax", "floor"), ("row", "torch", "round"),
                                    ("leaf", "torch", "mergekit")]:  # fmt: skip
      kw = dict(scope=scope, layout=layout, counting=counting)
      fast = jax.jit(lambda v, b, e, kw=kw: sparsify.breadcrumbs(v, 0.3, 0.05, inputs=(b, e), **kw))
      plain = jax.jit(lambda v, kw=kw: sparsify.breadcrumbs(v, 0.3, 0.05, **kw))
      got, want = fast(vectors, base, experts), plain(vectors)
      for g, w in zip(got, want, strict=True):
        chex.assert_trees_all_equal(g, w)
      assert any(np.any(np.asarray(g["w"]) == 0) for g in got)  # Something was dropped.
      assert "callback" in fast.lower(vectors, base, experts).as_text()

  @chex.variants(with_jit=True, without_jit=True)
  def test_consensus(self):
    # tau_MTL = [2, 3, 0]; m1 = |t1| >= .5|t2| = [T, F, T]; m2 = |t2| >= .5|t1| = [T, T, T].
    fn = self.variant(rules.consensus)
    out = fn(
      _zeros(3),
      [_vec(1.0, 0.0, 2.0), _vec(1.0, 3.0, -2.0)],
      tall_lambda=0.5,
      min_tasks=2,
      scale=1.0,
    )
    chex.assert_trees_all_close(out, _vec(2.0, 0.0, 0.0))

  def test_tall_task_model(self):
    out = rules.tall_task_model(
      _zeros(3), [_vec(1.0, 0.0, 2.0), _vec(1.0, 3.0, -2.0)], 0, tall_lambda=0.5
    )
    chex.assert_trees_all_close(out, _vec(2.0, 0.0, 0.0))

  @chex.variants(with_jit=True, without_jit=True)
  def test_emr(self):
    # Sum [3, 2, -1] -> signs [+, +, -]; unified = [2, 3, -1]; m1 = [T, F, F], m2 = [T, T, T];
    # rescalers 3/2 and 5/6.
    merged = self.variant(rules.emr_merging)(
      _zeros(3), [_vec(2.0, -1.0, 0.0), _vec(1.0, 3.0, -1.0)]
    )
    chex.assert_trees_all_close(merged.unified, _vec(2.0, 3.0, -1.0))
    np.testing.assert_allclose(merged.rescalers, [1.5, 5 / 6], rtol=1e-6)
    chex.assert_trees_all_close(rules.emr_task_model(_zeros(3), merged, 0), _vec(3.0, 0.0, 0.0))
    chex.assert_trees_all_close(
      rules.emr_task_model(_zeros(3), merged, 1), _vec(5 / 3, 2.5, -5 / 6), rtol=1e-6
    )

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    ("orthogonal", (0.0, 1.0), (0.0, 0.0)),  # cos 0 -> t = 0 -> base.
    ("equal", (1.0, 0.0), (1.0, 0.0)),  # cos 1 -> t = 1 -> base + mean tau.
    ("cos_half", (0.5, np.sqrt(3) / 2), (0.5, np.sqrt(3) / 6)),  # t = 2/3.
  )
  def test_model_stock(self, second, expected):
    out = self.variant(rules.model_stock)(_zeros(2), [_vec(1.0, 0.0), _vec(*second)])
    chex.assert_trees_all_close(out, _vec(*expected), atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_slerp(self):
    fn = self.variant(rules.slerp)
    out = fn(_zeros(2), [_vec(1.0, 0.0), _vec(0.0, 1.0)], t=0.5)
    chex.assert_trees_all_close(out, _vec(np.sqrt(0.5), np.sqrt(0.5)), atol=1e-6)
    out = fn(_zeros(2), [_vec(1.0, 1.0), _vec(2.0, 2.0)], t=0.25)  # Parallel: linear.
    chex.assert_trees_all_close(out, _vec(1.25, 1.25), atol=1e-6)


# The data-free rules; the data-dependent ones (statistics needed) have their own properties in
# tests/data_dependent_test.py.
ALL_RULES = sorted(n for n, r in rules.REGISTRY.items() if not r.data_dependent)


class PropertyTest(chex.TestCase):
  @parameterized.parameters(*ALL_RULES)
  def test_shapes_dtypes_and_jit_agreement(self, name):
    base = _random_tree(0, jnp.bfloat16)
    experts = [_random_tree(i + 1, jnp.bfloat16) for i in range(2 if name == "slerp" else 3)]
    jitted = rules.merge(name, base, experts, **_kwargs(name))
    eager = rules.merge(name, base, experts, jit=False, **_kwargs(name))
    # Task-specific results (EMR, TALL masks): check one task's model.
    jitted = rules.task_models(jitted, base, len(experts))[1]
    eager = rules.task_models(eager, base, len(experts))[1]
    chex.assert_trees_all_equal_shapes_and_dtypes(jitted, base)
    chex.assert_trees_all_close(
      jax.tree.map(lambda x: x.astype(jnp.float32), jitted),
      jax.tree.map(lambda x: x.astype(jnp.float32), eager),
      atol=2e-2,  # bf16 outputs: one rounding step.
    )

  @parameterized.parameters(*ALL_RULES)
  def test_zero_task_vectors_give_base(self, name):
    base = _random_tree(0)
    out = rules.merge(name, base, [base, base], **_kwargs(name))
    for model in rules.task_models(out, base, 2):
      chex.assert_trees_all_close(model, base, atol=1e-6)

  def test_density_one_reduces_to_task_arithmetic(self):
    base = _random_tree(0)
    experts = [_random_tree(i) for i in (1, 2, 3)]
    ta = rules.task_arithmetic(base, experts, scale=0.7)
    dare = rules.dare(base, experts, key=jax.random.key(3), density=1.0, scale=0.7)
    chex.assert_trees_all_close(dare, ta, atol=1e-6)
    for scope in ("model", "leaf"):
      # One expert: nothing to elect against, so TIES at density 1 is task arithmetic.
      ties = rules.ties_merging(base, experts[:1], density=1.0, scale=0.7, trim_scope=scope)
      chex.assert_trees_all_close(
        ties, rules.task_arithmetic(base, experts[:1], scale=0.7), atol=1e-6
      )

  def test_dtype_policy_computes_in_float32(self):
    # τt = 2^-7 (bf16's epsilon at 1) and λ = 0.5: θ = 1 + 16 · 2^-8 = 1.0625 is a bf16 number,
    # but adding each λτt = 2^-8 to a bf16 running θ rounds it away (to 1.0).
    base = {"w": jnp.ones(3, jnp.bfloat16)}
    experts = [{"w": jnp.full(3, 1 + 2.0**-7, jnp.bfloat16)}] * 16
    out = rules.task_arithmetic(base, experts, scale=0.5)
    self.assertEqual(out["w"].dtype, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(out["w"], np.float32), 1.0625)

  def test_ties_matches_sort_reference(self):
    rng = np.random.default_rng(0)
    base = {"a": jnp.zeros((50, 20)), "b": jnp.zeros(37)}
    experts = [
      jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), base)
      for _ in range(4)
    ]
    out = rules.ties_merging(base, experts, density=0.2, scale=1.0)
    # NumPy reference: sort-based top-k over the whole flattened task vector.
    flat = [np.concatenate([np.ravel(e["a"]), np.ravel(e["b"])]) for e in experts]
    k = round(0.2 * flat[0].size)
    trimmed = []
    for f in flat:
      keep = np.zeros(f.size, bool)
      keep[np.argsort(-np.abs(f))[:k]] = True
      trimmed.append(np.where(keep, f, 0.0))
    trimmed = np.stack(trimmed)
    sign = np.sign(trimmed.sum(0))
    sign[sign == 0] = 1.0 if trimmed.sum() >= 0 else -1.0
    agree = np.where(sign > 0, trimmed > 0, trimmed < 0)
    expected = (trimmed * agree).sum(0) / np.maximum(agree.sum(0), 1)
    got = np.concatenate([np.ravel(out["a"]), np.ravel(out["b"])])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)

  def test_sweep_does_not_retrace(self):
    base, experts = _random_tree(0), [_random_tree(1), _random_tree(2)]
    fn = jax.jit(chex.assert_max_traces(rules.ties_merging, n=1))
    for density, scale in ((0.2, 1.0), (0.5, 0.3), (0.9, 2.0)):
      fn(base, experts, density=jnp.float32(density), scale=jnp.float32(scale))
    # The front door passes scalars (and keys) as arrays, so its cached executable is reused.
    traces = []

    def counting(base, experts, *, key, density=0.5, scale=1.0):
      traces.append(density)  # Runs once per trace.
      return rules.dare_ties(base, experts, key=key, density=density, scale=scale)

    rules.register(
      "counting_dare_ties", counting, key=spec.KEY, density=spec.FRACTION, scale=spec.SCALE
    )
    try:
      for seed, density, scale in ((0, 0.5, 0.1), (1, 0.3, 0.2), (2, 0.9, 1.5)):
        rules.merge(
          "counting_dare_ties",
          base,
          experts,
          key=jax.random.key(seed),
          density=density,
          scale=scale,
        )
    finally:
      del rules.REGISTRY["counting_dare_ties"]
    self.assertLen(traces, 1)

  def test_dare_determinism_and_keep_rate(self):
    base = {"w": jnp.zeros(200_000)}
    experts = [{"w": jnp.ones(200_000)}]
    a = rules.dare(base, experts, key=jax.random.key(7), density=0.3)
    b = rules.dare(base, experts, key=jax.random.key(7), density=0.3)
    c = rules.dare(base, experts, key=jax.random.key(8), density=0.3)
    chex.assert_trees_all_equal(a, b)
    self.assertFalse(np.array_equal(a["w"], c["w"]))
    kept = np.asarray(a["w"]) != 0
    self.assertAlmostEqual(kept.mean(), 0.3, delta=0.005)
    np.testing.assert_allclose(np.asarray(a["w"])[kept], 1 / 0.3, rtol=1e-6)  # 1/(1-p) rescale.

  def test_dare_l1_rescale_keeps_leaf_l1_norm(self):
    base = {"w": jnp.zeros(1000)}
    expert = {"w": jnp.linspace(-1.0, 2.0, 1000)}
    out = rules.dare(base, [expert], key=jax.random.key(0), density=0.2, rescale="l1")
    np.testing.assert_allclose(np.abs(out["w"]).sum(), np.abs(expert["w"]).sum(), rtol=1e-5)

  def test_della_is_unbiased_and_keeps_large_entries_more(self):
    base = {"w": jnp.zeros((1, 100))}
    expert = {"w": jnp.linspace(0.01, 1.0, 100)[None]}
    outs = np.stack(
      [
        np.asarray(
          rules.della(
            base,
            [expert],
            key=jax.random.key(i),
            density=0.5,
            epsilon=0.4,
            scale=1.0,
            combine="sum",
            layout="torch",  # [1, 100]: one output neuron with 100 inputs.
          )["w"][0]
        )
        for i in range(400)
      ]
    )
    np.testing.assert_allclose(outs.mean(0).mean(), np.asarray(expert["w"]).mean(), rtol=0.05)
    kept = (outs != 0).mean(0)
    self.assertLess(kept[:20].mean(), 0.25)  # Smallest: p ~ 0.1-0.18.
    self.assertGreater(kept[-20:].mean(), 0.75)  # Largest: p ~ 0.82-0.9.

  def test_masks_do_not_depend_on_leaf_order_or_other_leaves(self):
    leaf = jnp.arange(1.0, 65.0)
    small = {"enc": {"w": leaf}}
    big = {"aaa": jnp.ones(5), "enc": {"w": leaf, "a": jnp.ones(3)}, "zzz": jnp.ones(2)}
    for name in ("dare", "della"):
      a = rules.REGISTRY[name](jax.tree.map(jnp.zeros_like, small), [small], key=jax.random.key(1))
      b = rules.REGISTRY[name](jax.tree.map(jnp.zeros_like, big), [big], key=jax.random.key(1))
      np.testing.assert_array_equal(a["enc"]["w"], b["enc"]["w"])
    # Merging a selected subset draws the same masks as merging the whole tree.
    whole = rules.merge("dare", jax.tree.map(jnp.zeros_like, big), [big], key=jax.random.key(1))
    part = rules.merge(
      "dare", jax.tree.map(jnp.zeros_like, big), [big], key=jax.random.key(1), include="enc/w"
    )
    np.testing.assert_array_equal(whole["enc"]["w"], part["enc"]["w"])
    np.testing.assert_array_equal(part["aaa"], 0.0)


class FrontDoorTest(parameterized.TestCase):
  def test_include_exclude_and_others(self):
    base = {"backbone": {"w": jnp.zeros(2)}, "head": jnp.zeros(2)}
    experts = [
      {"backbone": {"w": jnp.ones(2)}, "head": jnp.full(2, 3.0)},
      {"backbone": {"w": jnp.ones(2)}, "head": jnp.full(2, 5.0)},
    ]
    out = rules.merge("task_arithmetic", base, experts, exclude="head", scale=0.5)
    chex.assert_trees_all_close(out, {"backbone": {"w": jnp.ones(2)}, "head": jnp.zeros(2)})
    out = rules.merge(
      "task_arithmetic", base, experts, include="backbone/.*", others="average", scale=0.5
    )
    chex.assert_trees_all_close(out["head"], jnp.full(2, 4.0))

  def test_emr_on_selected_leaves(self):
    base = {"backbone": {"w": jnp.zeros(3)}, "head": jnp.ones(2)}
    experts = [
      {"backbone": {"w": jnp.array([2.0, -1.0, 0.0])}, "head": jnp.ones(2)},
      {"backbone": {"w": jnp.array([1.0, 3.0, -1.0])}, "head": jnp.ones(2)},
    ]
    merged = rules.merge("emr", base, experts, include="backbone/.*")
    model = rules.emr_task_model(base, merged, 0)
    chex.assert_trees_all_close(
      model, {"backbone": {"w": _vec(3.0, 0, 0)["w"]}, "head": jnp.ones(2)}
    )

  def _pair(self):
    return _random_tree(0), [_random_tree(1)]

  @parameterized.parameters(0.0, 1.5, -0.1, float("nan"))
  def test_bad_density(self, density):
    base, experts = self._pair()
    with self.assertRaisesRegex(ValueError, r"density=.* is outside \(0, 1\]|not finite"):
      rules.merge("ties", base, experts, density=density)

  def test_bad_gamma(self):
    base, experts = self._pair()
    with self.assertRaisesRegex(ValueError, r"gamma=1.0 is outside"):
      rules.merge("breadcrumbs", base, experts, gamma=1.0)

  def test_unknown_rule_and_hparam(self):
    base, experts = self._pair()
    with self.assertRaisesRegex(KeyError, "Unknown rule 'tie'"):
      rules.merge("tie", base, experts)
    with self.assertRaisesRegex(TypeError, r"no hyper-parameter\(s\) \['dnsity'\]"):
      rules.merge("ties", base, experts, dnsity=0.2)

  def test_random_rule_needs_key(self):
    base, experts = self._pair()
    with self.assertRaisesRegex(ValueError, "key=jax.random.key"):
      rules.merge("dare", base, experts)

  def test_structure_mismatch_names_leaf(self):
    base, (expert,) = self._pair()
    del expert["enc"]["bias"]
    with self.assertRaisesRegex(ValueError, r"experts\[0\].*missing leaves \['enc/bias'\]"):
      rules.merge("task_arithmetic", base, [expert])

  def test_shape_mismatch_names_leaf(self):
    base, (expert,) = self._pair()
    expert["enc"]["kernel"] = jnp.zeros((6, 5))
    with self.assertRaisesRegex(ValueError, r"Leaf 'enc/kernel'.*shape \(6, 5\).*\(6, 4\)"):
      rules.merge("task_arithmetic", base, [expert])

  def test_dtype_mismatch_names_leaf(self):
    base, (expert,) = self._pair()
    expert["tiny"] = expert["tiny"].astype(jnp.bfloat16)
    with self.assertRaisesRegex(ValueError, r"Leaf 'tiny'.*bfloat16.*float32.*Cast"):
      rules.merge("task_arithmetic", base, [expert])

  def test_nan_names_leaf(self):
    base, (expert,) = self._pair()
    expert["enc"]["bias"] = expert["enc"]["bias"].at[2].set(jnp.nan)
    with self.assertRaisesRegex(ValueError, r"Leaf 'enc/bias' of experts\[0\] holds 1 NaN/Inf"):
      rules.merge("ties", base, [expert])

  def test_selection_matching_nothing(self):
    base, experts = self._pair()
    with self.assertRaisesRegex(ValueError, "matches no leaf"):
      rules.merge("task_arithmetic", base, experts, include="decoder/.*")

  def test_rule_arity(self):
    base = _random_tree(0)
    with self.assertRaisesRegex(ValueError, "exactly 2"):
      rules.merge("slerp", base, [base])
    with self.assertRaisesRegex(ValueError, "at least 2"):
      rules.merge("model_stock", base, [base])
    with self.assertRaisesRegex(ValueError, "at least one expert"):
      rules.merge("ties", base, [])


if __name__ == "__main__":
  absltest.main()


class SparsifyCombineTest(chex.TestCase):
  def test_named_rules_are_points_of_the_grid(self):
    base = _random_tree(0)
    experts = [_random_tree(i) for i in (1, 2, 3)]
    key = jax.random.key(4)
    pairs = [
      (
        dict(sparsifier="ties_trim", combine="ties", density=0.3, scale=0.9),
        rules.ties_merging(base, experts, density=0.3, scale=0.9),
      ),
      (
        dict(sparsifier="dare", combine="ties", density=0.4, scale=0.9, key=key),
        rules.dare_ties(base, experts, key=key, density=0.4, scale=0.9, trim_density=None),
      ),
      (
        dict(sparsifier="breadcrumbs", combine="sum", density=0.5, gamma=0.1, scale=0.5),
        rules.breadcrumbs(base, experts, density=0.5, gamma=0.1, scale=0.5),
      ),
      (
        dict(sparsifier="none", combine="sum", scale=0.3),
        rules.task_arithmetic(base, experts, scale=0.3),
      ),
    ]
    for kwargs, expected in pairs:
      chex.assert_trees_all_close(
        rules.merge("sparsify_combine", base, experts, **kwargs), expected, atol=1e-6
      )

  def test_trim_then_sum_hand_worked(self):
    # Trim at 50% (see TIES_TAUS), then sum: [4, -2, 0, -3.5].
    out = rules.sparsify_combine(_zeros(4), TIES_TAUS, density=0.5, combine="sum")
    chex.assert_trees_all_close(out, _vec(4.0, -2.0, 0.0, -3.5))

  def test_random_sparsifier_needs_key(self):
    with self.assertRaisesRegex(ValueError, "is random"):
      rules.merge("sparsify_combine", _zeros(4), TIES_TAUS, sparsifier="dare")


class RandomMaskTest(parameterized.TestCase):
  def test_batched_leaf_keys_equal_per_leaf_keys(self):
    key = jax.random.key(11)
    paths = ["enc/w", "enc/b", "head"]
    data = sparsify.leaf_key_data(key, 3, paths)
    for t in range(3):
      for i, p in enumerate(paths):
        np.testing.assert_array_equal(data[t, i], jax.random.key_data(sparsify.leaf_key(key, t, p)))

  @parameterized.parameters("threefry", "raw", "traced", "rbg")
  def test_leaf_keys_host_folds_equal_jax_folds(self, how):
    # Concrete threefry keys fold in NumPy (no compile); traced and other keys in jax.
    paths = [f"layer_{i}/w" for i in range(40)]
    for seed in (0, 7, 2**31 + 5):
      key = jax.random.key(seed, impl="rbg" if how == "rbg" else None)
      want = np.stack(
        [[jax.random.key_data(sparsify.leaf_key(key, t, p)) for p in paths] for t in range(3)]
      )
      if how == "raw":
        key = jax.random.PRNGKey(seed)
      if how == "traced":
        got = jax.jit(lambda k: sparsify.leaf_key_data(k, 3, paths))(key)
      else:
        got = sparsify.leaf_key_data(key, 3, paths)
      self.assertEqual(isinstance(got, np.ndarray), how in ("threefry", "raw"))
      np.testing.assert_array_equal(got, want)

  def test_uniforms_look_uniform_and_independent(self):
    key_data = sparsify.leaf_key_data(jax.random.key(0), 2, ["w"])
    u0 = np.asarray(sparsify.uniform_from_key_data(key_data[0, 0], (1 << 20,)))
    u1 = np.asarray(sparsify.uniform_from_key_data(key_data[1, 0], (1 << 20,)))
    self.assertTrue(((u0 >= 0) & (u0 < 1)).all())
    counts, _ = np.histogram(u0, bins=64, range=(0, 1))
    chi2 = ((counts - counts.mean()) ** 2 / counts.mean()).sum()
    self.assertLess(chi2, 120)  # 63 degrees of freedom: p < 1e-5 beyond ~120.
    self.assertLess(abs(np.corrcoef(u0[:-1], u0[1:])[0, 1]), 0.005)  # Neighbouring entries.
    self.assertLess(abs(np.corrcoef(u0, u1)[0, 1]), 0.005)  # Two experts' masks.
    both = np.mean((u0 < 0.3) & (u1 < 0.3))
    self.assertAlmostEqual(both, 0.09, delta=0.002)

  def test_uniforms_do_not_depend_on_shape_or_scope(self):
    d = sparsify.leaf_key_data(jax.random.key(0), 1, ["w"])[0, 0]
    flat = sparsify.uniform_from_key_data(d, (12,))
    np.testing.assert_array_equal(sparsify.uniform_from_key_data(d, (3, 4)).ravel(), flat)
