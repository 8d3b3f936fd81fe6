"""Learned methods against their reference code (issue 10): hand-worked examples and NumPy
re-statements of AdaMerging's and aTLAS's reference computations, one class per item.

1. AdaMerging++'s basis is `ties_merging_split` (trim, elect, keep the agreeing entries).
2. aTLAS unsupervised is UFM: weak-view targets, strong-view loss, trusted top-k per class.
8. AdaMerging clamps Λ in the forward pass and sums two batches per task and step.
9. aTLAS / DV-BASI epochs run the tasks in lockstep over the smallest one.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

from configs.learned import adamerging, adamerging_plus, atlas, atlas_unsupervised, dv_basi
from mergejax import learned
from mergejax.benchmarks import synthetic
from mergejax.learned import bases, loop, objectives, parametrizations
from mergejax.learned import step as step_lib

_SAVED_FLAG = None


def setUpModule():
  global _SAVED_FLAG
  _SAVED_FLAG = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)


def tearDownModule():
  jax.config.update("jax_disable_most_optimizations", _SAVED_FLAG)


def _reference_ties_split(flat: np.ndarray, keep: int) -> np.ndarray:
  """AdaMerging's `ties_merging_split` on flattened task vectors `[T, d]`, in NumPy.

  `topk_values_mask` keeps |x| >= the (d − k)-th smallest |x| per row (torch.kthvalue is 1-based
  and inclusive, so it keeps k + 1 entries for k = int(d · K)); here `keep` is that count.
  `resolve_sign` elects sign(Σ_t), zeros going to the majority sign; `disjoint_merge_split` keeps
  the entries whose sign agrees.
  """
  d = flat.shape[1]
  kth = np.sort(np.abs(flat), axis=1)[:, d - keep][:, None]
  trimmed = flat * (np.abs(flat) >= kth)
  sign = np.sign(trimmed.sum(axis=0))
  sign[sign == 0] = np.sign(sign.sum())
  agree = np.where(sign[None] > 0, trimmed > 0, trimmed < 0)
  return trimmed * agree


def _arrays(tree: dict) -> dict:
  return {k: jnp.asarray(v, jnp.float32) for k, v in tree.items()}


def _flatten(tree) -> np.ndarray:
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


class AdaMergingPlusBasisTest(absltest.TestCase):
  """Item 1: the basis is the per-task disjoint split, not the trim alone."""

  def test_hand_worked_split(self):
    tasks = [
      {"a": [4.0, -1.0, 0.5, 3.0], "b": [-2.0, 0.1]},
      {"a": [-5.0, 2.0, 0.2, 1.0], "b": [1.0, -3.0]},
      {"a": [2.0, -4.0, 0.1, -0.3], "b": [3.0, 0.5]},
    ]
    vectors = [_arrays(t) for t in tasks]
    # Top 3 of 6 per task: τ1 keeps 4, 3, −2; τ2 keeps −5, −3, 2; τ3 keeps −4, 3, 2. Σ per
    # entry: a = (1, −2, 0, 3), b = (1, −3) → elected signs (+, −, ·, +), (+, −).
    split = bases.ties_split(vectors, density=0.5)
    expected = [
      {"a": [4.0, 0.0, 0.0, 3.0], "b": [0.0, 0.0]},  # −2 disagrees with + in b[0].
      {"a": [0.0, 0.0, 0.0, 0.0], "b": [0.0, -3.0]},  # −5 and 2 disagree in a.
      {"a": [2.0, -4.0, 0.0, 0.0], "b": [3.0, 0.0]},
    ]
    for got, want in zip(split, expected, strict=True):
      chex.assert_trees_all_close(got, _arrays(want))
    # The trim alone (the former basis) keeps the disagreeing entries.
    trimmed = bases.make_basis(
      {"a": jnp.zeros(4), "b": jnp.zeros(2)}, vectors, dict(name="ties_trimmed", density=0.5)
    )
    self.assertEqual(float(trimmed[0]["b"][0]), -2.0)

  def test_matches_the_reference_on_random_vectors(self):
    rng = np.random.default_rng(0)
    base = {"w": jnp.zeros((7, 5)), "b": jnp.zeros(5)}
    experts = [
      jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), base) for _ in range(4)
    ]
    d = 40
    keep = int(d * 0.2) + 1  # What the reference keeps at K = 20% (see `_reference_ties_split`).
    basis = bases.make_basis(base, experts, dict(name="ties_split", density=keep / d))
    flat = np.stack([_flatten(e) for e in experts])
    expected = _reference_ties_split(flat, keep)
    np.testing.assert_array_equal(np.stack([_flatten(v) for v in basis]), expected)

  def test_recipe_uses_the_split(self):
    self.assertEqual(
      adamerging_plus.get_config().basis.to_dict(), dict(name="ties_split", density=0.2)
    )


class UFMTest(parameterized.TestCase):
  """Item 2: aTLAS's unsupervised FixMatch (learn_ufm.py), restated in NumPy."""

  def test_trusted_top_k_per_class(self):
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.55, 0.45], [0.3, 0.7], [0.95, 0.05]])
    # k = ⌊6 / 2 · 0.5⌋ = 1: class 0's most probable is row 5, class 1's is row 2.
    got = objectives.trusted_samples(probs, trusted_fraction=0.5)
    np.testing.assert_array_equal(got, [False, False, True, False, False, True])
    # The reference's default share (10%) with its cap: k = min(⌊n / C / 10⌋, 100).
    many = np.random.default_rng(0).dirichlet(np.ones(3), size=3000)
    self.assertEqual(objectives.trusted_samples(many).sum(), 3 * 100)
    self.assertEqual(objectives.trusted_samples(many[:90]).sum(), 3 * 3)
    np.testing.assert_array_equal(
      objectives.trusted_samples(probs, trusted="all"), np.ones(6, bool)
    )

  @parameterized.parameters(0.99, 0.5)
  def test_loss_matches_the_reference(self, threshold):
    rng = np.random.default_rng(1)
    weak = rng.normal(size=(8, 4)).astype(np.float32) * 4
    strong = rng.normal(size=(8, 4)).astype(np.float32)
    labels = rng.integers(0, 4, 8)
    trusted = np.array([1, 0, 0, 1, 0, 0, 0, 0], bool)
    # ssl_loss_trusted: softmax(weak) (the ×0.5 "sharpening" renormalizes to itself), trusted rows
    # replaced by one-hot targets, w = max(target) > thresh, Σ w·CE(strong, target) / Σ w.
    p = np.exp(weak - weak.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    targets = np.where(trusted[:, None], np.eye(4)[labels], p)
    w = (targets.max(1) > threshold).astype(np.float64)
    log_q = strong - strong.max(1, keepdims=True)
    log_q = log_q - np.log(np.exp(log_q).sum(1, keepdims=True))
    expected = (w * -(targets * log_q).sum(1)).sum() / w.sum()
    got = objectives.ufm_loss(weak, strong, labels, trusted, threshold=threshold)
    np.testing.assert_allclose(got, expected, rtol=1e-5)

  def test_gradient_flows_through_the_strong_view_only(self):
    weak, strong = jnp.ones((2, 3)) * jnp.array([5.0, 0.0, 0.0]), jnp.zeros((2, 3))
    labels, trusted = jnp.array([0, 1]), jnp.array([False, True])
    g_weak, g_strong = jax.grad(objectives.ufm_loss, argnums=(0, 1))(
      weak, strong, labels, trusted, threshold=0.9
    )
    np.testing.assert_array_equal(g_weak, 0.0)
    self.assertGreater(float(jnp.abs(g_strong).sum()), 0.0)
    # Nothing confident: zero loss (the reference would divide by zero).
    nobody = jnp.zeros(2, bool)
    self.assertEqual(float(objectives.ufm_loss(strong, strong, labels, nobody, threshold=0.9)), 0.0)

  def _problem(self):
    raw = synthetic.make_problem(4, num_tasks=2, hidden=16, num_train=32, num_val=16, num_test=16)
    return raw, synthetic.learn_problem(raw)

  def test_first_step_loss_through_the_loop(self):
    # With every example trusted (the reference script as it runs) and identity views, the first
    # step's loss is Σ_t mean CE(θ_init logits, argmax θ_init logits) on the step's batches.
    raw, _ = self._problem()
    config = atlas_unsupervised.get_config("runlocal")
    config.objective.trusted = "all"
    config.train.update(steps=1, epochs=0, log_every=1, eval_every=-1, batch_size=8)
    basis = bases.make_basis(raw.base, raw.experts, config.basis)
    blocks = parametrizations.make_blocks(raw.base, granularity="layer")
    scaling = parametrizations.blockwise_scaling(blocks, init=0.0)
    result = loop.train(
      raw.apply_fn,
      raw.base,
      basis,
      raw.train,
      config,
      parametrization=scaling,
      objective=objectives.make(config.objective),
      optimizer=optax.sgd(0.0),
      augment=lambda key, x, view: x,
    )
    key = jax.random.key(config.seed)
    batches = step_lib.sample_batches(key, jnp.int32(0), [{"x": d["x"]} for d in raw.train], 8)
    expected = 0.0
    for t, batch in enumerate(batches):
      logits = np.asarray(raw.apply_fn(raw.base, batch["x"], t), np.float64)
      log_q = logits - logits.max(1, keepdims=True)
      log_q -= np.log(np.exp(log_q).sum(1, keepdims=True))
      expected += -log_q.max(1).mean()  # CE against its own argmax.
    np.testing.assert_allclose(result.history["loss"][0][1], expected, rtol=1e-5)

  def test_needs_views_and_uses_the_strong_one(self):
    raw, problem = self._problem()
    config = atlas_unsupervised.get_config("runlocal")
    config.objective.update(trusted="all")
    config.train.update(epochs=0, steps=2, eval_every=-1, log_every=1)
    with self.assertRaisesRegex(ValueError, "augment"):
      learned.run(problem._replace(augment=None), config)
    same = learned.run(problem._replace(augment=lambda key, x, view: x), config)
    strong = learned.run(problem, config)  # The synthetic strong view adds noise.
    self.assertNotEqual(same.history["loss"][0][1], strong.history["loss"][0][1])

  def test_recipe_is_ufm(self):
    config = atlas_unsupervised.get_config()
    self.assertEqual(config.objective.name, "ufm")
    self.assertEqual((config.objective.threshold, config.objective.trusted), (0.99, "top_k"))


class AdaMergingStepTest(absltest.TestCase):
  """Item 8: Λ clamped in the forward pass; two batches per task and step."""

  def test_forward_clamp_gradient_is_torch_clamp(self):
    raw = jnp.array([-0.5, 0.3, 1.5, 1.0, 0.0])
    grad = jax.grad(lambda c: jnp.sum(parametrizations.clamp_in_forward(c, (0.0, 1.0)) * 2.0))(raw)
    # torch.clamp: gradient passes on [min, max] (bounds included), zero outside.
    np.testing.assert_array_equal(grad, [0.0, 2.0, 0.0, 2.0, 2.0])

  def _one_block_step(self, clamp_mode):
    # θ = θ0 + Λ v with θ0 = 0, v = 1, one block; logits = θ; loss = −mean(logits) = −Λ.
    base, basis = {"w": jnp.zeros(())}, [{"w": jnp.ones(())}]
    blocks = parametrizations.make_blocks(base, granularity="task")
    scaling = parametrizations.blockwise_scaling(
      blocks, init=0.8, clamp=(0.0, 1.0), clamp_mode=clamp_mode
    )
    objective = objectives.Objective(loss=lambda forward, batch: -jnp.mean(forward()))
    step = step_lib.make_train_step(
      lambda params, x, t: x * params["w"], scaling, objective, optax.sgd(1.0), batch_size=1
    )
    coeffs = scaling.project(scaling.init(base, basis))
    rng = jax.random.key_data(jax.random.key(0))
    state = step_lib.TrainState(coeffs, optax.sgd(1.0).init(coeffs), jnp.int32(0), rng)
    raws, effective = [], []
    for _ in range(2):
      state, _ = step(state, base, basis, ({"x": jnp.ones((2, 1))},))
      raws.append(float(state.coeffs[0, 0]))
      effective.append(float(scaling.merge(state.coeffs, base, basis)["w"]))
    return raws, effective

  def test_forward_clamp_against_projection_by_hand(self):
    # SGD lr 1 on −Λ from 0.8: the first step moves Λ to 1.8. Forward clamp: the raw Λ keeps 1.8,
    # its gradient is then 0, the merge sees 1.0. Projection: Λ is put back to 1.0 each step.
    moved = float(np.float32(0.8) + np.float32(1.0))  # 1.8 in float32.
    self.assertEqual(self._one_block_step("forward"), ([moved, moved], [1.0, 1.0]))
    self.assertEqual(self._one_block_step("project"), ([1.0, 1.0], [1.0, 1.0]))

  def test_two_batches_per_step_sum_their_means(self):
    raw = synthetic.make_problem(5, num_tasks=2, hidden=8, num_train=16, num_val=8, num_test=40)
    basis = [jax.tree.map(jnp.subtract, e, raw.base) for e in raw.experts]
    blocks = parametrizations.make_blocks(raw.base, granularity="layer")
    scaling = parametrizations.blockwise_scaling(blocks, init=0.3)
    data = tuple({"x": d["x"]} for d in raw.test)
    step = step_lib.make_train_step(
      raw.apply_fn, scaling, objectives.entropy(), optax.sgd(0.0), batch_size=4, batches_per_step=2
    )
    coeffs = scaling.init(raw.base, basis)
    rng = jax.random.key_data(jax.random.key(7))
    donated = jnp.array(coeffs, copy=True)  # The step donates its state.
    state = step_lib.TrainState(donated, optax.sgd(0.0).init(coeffs), jnp.int32(3), rng)
    _, metrics = step(state, raw.base, basis, data)
    # Reference: the step's 8 rows per task are two batches of 4; the loss is the sum over tasks
    # and batches of each batch's mean entropy.
    rows = step_lib.sample_batches(jax.random.key(7), jnp.int32(3), data, 8)
    merged = scaling.merge(coeffs, raw.base, basis)
    expected = 0.0
    for t, batch in enumerate(rows):
      logits = np.asarray(raw.apply_fn(merged, batch["x"], t), np.float64)
      p = np.exp(logits - logits.max(1, keepdims=True))
      p /= p.sum(1, keepdims=True)
      h = -(p * np.log(p)).sum(1)
      expected += h[:4].mean() + h[4:].mean()
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)

  def test_recipe_defaults(self):
    config = adamerging.get_config()
    self.assertEqual(
      (config.coefficients.clamp_mode, config.train.batches_per_step), ("forward", 2)
    )
    self.assertEqual(atlas.get_config().train.batches_per_step, 1)


class EpochTest(absltest.TestCase):
  """Item 9: one epoch runs the tasks in lockstep over the smallest task (aTLAS's reference)."""

  def test_lockstep_over_the_smallest(self):
    data = [{"x": jnp.arange(12)}, {"x": jnp.arange(7) + 100}]
    self.assertEqual(step_lib.steps_per_epoch(data, 3, "smallest"), 2)
    self.assertEqual(step_lib.steps_per_epoch(data, 3, "largest"), 4)
    key = jax.random.key(0)

    def batch(task, step, mode):
      batches = step_lib.sample_batches(key, jnp.int32(step), data, 3, epoch_length=mode)
      return np.asarray(batches[task]["x"])

    def perm(task, epoch):  # The reference computation: epoch e of task t is permutation(t, e).
      task_key = jax.random.fold_in(jax.random.fold_in(key, task), epoch)
      return np.asarray(jax.random.permutation(task_key, len(data[task]["x"])))

    # Lockstep: at step 2 every task starts epoch 1, the large one after only 6 of its 12 rows.
    np.testing.assert_array_equal(batch(0, 2, "smallest"), perm(0, 1)[:3])
    np.testing.assert_array_equal(batch(1, 2, "smallest"), perm(1, 1)[:3] + 100)
    # "largest": the large task is still in its epoch 0; the small one wrapped on its own.
    np.testing.assert_array_equal(batch(0, 2, "largest"), perm(0, 0)[6:9])
    np.testing.assert_array_equal(batch(1, 2, "largest"), perm(1, 1)[:3] + 100)
    # Equal task sizes (the digits and synthetic benchmarks): both modes draw the same batches.
    equal = [{"x": jnp.arange(12)}, {"x": jnp.arange(12)}]
    for s in range(6):
      a = step_lib.sample_batches(key, jnp.int32(s), equal, 3, epoch_length="smallest")
      b = step_lib.sample_batches(key, jnp.int32(s), equal, 3, epoch_length="largest")
      chex.assert_trees_all_equal(a, b)

  def test_recipe_defaults(self):
    for module in (atlas, dv_basi):
      self.assertEqual(module.get_config().train.epoch_length, "smallest")


if __name__ == "__main__":
  absltest.main()
