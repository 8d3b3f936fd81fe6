"""Tests for mergejax.learned: methods, objectives, bases, recipes and plots, on tiny tasks."""

import pathlib
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from configs import learned as recipes_lib
from configs.learned import (
  adamerging,
  adamerging_plus,
  adamerging_taskwise,
  atlas,
  atlas_unsupervised,
  dv_basi,
  dv_basi_unsupervised,
)
from mergejax import learned
from mergejax.benchmarks import synthetic
from mergejax.benchmarks.common import learned_plots as plots
from mergejax.learned import bases, evaluation, objectives

_NUM_TEST = 40  # No other split or batch has this many rows: calls with it touch test data.


def _raw_problem():
  return synthetic.make_problem(
    2, num_tasks=3, hidden=16, num_train=48, num_val=32, num_test=_NUM_TEST
  )


def _val_metrics(problem, params):
  return evaluation.make_evaluator(problem.apply_fn).metrics(params, problem.splits["validation"])


_SAVED_FLAG = None


def setUpModule():
  # Compilation dominates these tests on CPU; XLA's optimizations buy nothing at these sizes.
  global _SAVED_FLAG
  _SAVED_FLAG = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)


def tearDownModule():
  jax.config.update("jax_disable_most_optimizations", _SAVED_FLAG)


class ObjectivesTest(absltest.TestCase):
  def test_pseudo_label(self):
    confident = jnp.array([[20.0, 0.0, 0.0], [0.0, 0.1, 0.0]])
    # Only the first row is confident (>= 0.99): its CE against its own argmax, over batch size 2.
    expected = -jax.nn.log_softmax(confident[0])[0] / 2
    got = objectives.pseudo_label_cross_entropy(confident, threshold=0.99)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    uniform = jnp.zeros((2, 4))
    self.assertEqual(float(objectives.pseudo_label_cross_entropy(uniform, threshold=0.99)), 0.0)

  def test_make_resolves_names_and_owns_options(self):
    self.assertFalse(objectives.make({"name": "entropy"}).needs_labels)
    self.assertTrue(objectives.make({"name": "cross_entropy"}).needs_labels)
    ufm = objectives.make({"name": "ufm", "threshold": 0.5, "trusted": "all"})
    self.assertTrue(ufm.needs_augment and ufm.prepare is not None)
    with self.assertRaisesRegex(ValueError, "Unknown objective"):
      objectives.make({"name": "mse"})
    with self.assertRaisesRegex(ValueError, "does not take"):
      objectives.make({"name": "entropy", "threshold": 0.5})
    with self.assertRaisesRegex(ValueError, "trusted"):
      objectives.make({"name": "ufm", "trusted": "some"})

  def test_losses_through_the_objective_interface(self):
    logits = jnp.array([[2.0, 0.0], [0.0, 1.0]])
    batch = {"x": jnp.zeros((2, 1)), "y": jnp.array([0, 0])}
    forward = lambda view=None: logits
    per_example = -jax.nn.log_softmax(logits)[jnp.arange(2), batch["y"]]
    np.testing.assert_allclose(
      objectives.cross_entropy().loss(forward, batch), per_example.mean(), rtol=1e-6
    )
    p = jax.nn.softmax(logits)
    np.testing.assert_allclose(
      objectives.entropy().loss(forward, batch), -(p * jnp.log(p)).sum(-1).mean(), rtol=1e-6
    )


class RecipesTest(parameterized.TestCase):
  @parameterized.named_parameters(
    ("adamerging", adamerging, "coefficients", "test", "layer", 0.3),
    ("adamerging_taskwise", adamerging_taskwise, "coefficients", "test", "task", 0.3),
    ("adamerging_plus", adamerging_plus, "coefficients", "test", "layer", 0.3),
    ("atlas", atlas, "coefficients", "validation", "layer", 0.0),
    ("atlas_unsupervised", atlas_unsupervised, "coefficients", "test", "layer", 0.0),
    ("dv_basi", dv_basi, "dv_basi", "validation", "layer", 0.1),
    ("dv_basi_unsupervised", dv_basi_unsupervised, "dv_basi", "test", "layer", 0.1),
  )
  def test_paper_recipes(self, module, method, split, granularity, init):
    full, small = module.get_config(), module.get_config("runlocal")
    for config in (full, small):
      config.lock()  # Every field has its default: a CLI override of a missing key fails.
      self.assertIn(config.method, learned.METHODS)
      self.assertEqual(config.method, method)
      self.assertEqual(config.adapt_split, split)
      self.assertEqual(config.coefficients.granularity, granularity)
      self.assertEqual(config.coefficients.init, init)
      objectives.make(config.objective)  # Resolves, options included.
    self.assertLessEqual(small.train.steps, full.train.steps)
    self.assertLessEqual(small.train.epochs, full.train.epochs)

  def test_paper_hyperparameters(self):
    config = adamerging.get_config()
    self.assertEqual((config.optim.name, config.optim.learning_rate), ("adam", 1e-3))
    self.assertEqual((config.train.steps, config.train.batch_size), (500, 16))
    self.assertEqual(tuple(config.coefficients.clamp), (0.0, 1.0))
    config = atlas.get_config()
    self.assertEqual(
      config.optim.to_dict(),
      dict(name="adamw", learning_rate=1e-3, weight_decay=0.1, clip_norm=1.0),
    )
    self.assertEqual((config.train.epochs, config.objective.name), (20, "cross_entropy"))
    config = dv_basi.get_config()
    self.assertEqual((config.optim.learning_rate, config.train.epochs), (0.01, 60))
    self.assertEqual(config.early_stopping.patience, 5)
    self.assertEqual(config.start.label, atlas.get_config().label)
    self.assertEqual(dv_basi_unsupervised.get_config().start.label, adamerging.get_config().label)

  def test_discovery_order_and_labels(self):
    found = recipes_lib.recipes()
    self.assertEqual(
      list(found),
      [
        "adamerging_taskwise",
        "adamerging",
        "adamerging_plus",
        "atlas",
        "atlas_unsupervised",
        "dv_basi",
        "dv_basi_unsupervised",
      ],
    )
    labels = [m.get_config().label for m in found.values()]
    self.assertLen(set(labels), len(labels))  # Every row has its own name.


class MethodsTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.raw = _raw_problem()
    cls.problem = synthetic.learn_problem(cls.raw)

  def _tempdir(self):
    path = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return pathlib.Path(path)

  def test_atlas_supervised_improves_validation_over_pretrained(self):
    problem = self.problem
    config = atlas.get_config("runlocal")
    config.train.epochs = 4
    config.optim.learning_rate = 0.05
    result = learned.run(problem, config)
    before = _val_metrics(problem, problem.base)
    after = _val_metrics(problem, result.params)
    self.assertLess(
      np.mean([m["cross_entropy"] for m in after]), np.mean([m["cross_entropy"] for m in before])
    )
    self.assertFalse(result.transductive)
    # Selection is the best validation evaluation.
    evals = result.history["eval"]
    best = evals[int(np.argmax([e[1] for e in evals]))][0]
    self.assertEqual(result.selected, {"best step": best})
    self.assertEqual(result.extras["best_step"], result.selected["best step"])

  def test_adamerging_lowers_test_entropy_and_is_transductive(self):
    problem = self.problem
    config = adamerging.get_config("runlocal")
    config.optim.learning_rate = 0.05
    result = learned.run(problem, config)
    self.assertTrue(result.transductive)
    self.assertEqual(result.selected, {"steps": config.train.steps})  # No validation: the last.
    evaluate = evaluation.make_evaluator(problem.apply_fn).metrics
    before = evaluate(_merged_at_init(problem, config), problem.splits["test"])
    after = evaluate(result.params, problem.splits["test"])
    self.assertLess(np.mean([m["entropy"] for m in after]), np.mean([m["entropy"] for m in before]))
    coeffs = np.asarray(result.extras["effective_coeffs"])
    self.assertEqual(coeffs.shape, (3, len(result.extras["blocks"])))
    self.assertTrue(np.all((coeffs >= 0) & (coeffs <= 1)))

  def test_bases(self):
    problem = self.problem
    config = adamerging_plus.get_config("runlocal")
    config.train.steps = 3
    spec = dict(name="ties_trimmed", density=0.2)
    trimmed = bases.make_basis(problem.base, problem.experts, spec)
    for vector in trimmed:
      leaves = jax.tree.leaves(vector)
      kept = sum(int(jnp.count_nonzero(x)) for x in leaves) / sum(x.size for x in leaves)
      self.assertAlmostEqual(kept, 0.2, delta=0.01)
    self.assertTrue(learned.run(problem, config).transductive)
    dare = bases.make_basis(problem.base, problem.experts, dict(name="dare", density=0.5))
    vectors = bases.make_basis(problem.base, problem.experts, dict(name="task_vectors"))
    for d, v in zip(jax.tree.leaves(dare), jax.tree.leaves(vectors), strict=True):
      np.testing.assert_allclose(d[d != 0], 2.0 * v[d != 0], rtol=1e-6)  # Rescaled by 1/0.5.
    with self.assertRaisesRegex(ValueError, "Unknown basis"):
      bases.make_basis(problem.base, problem.experts, dict(name="svd"))

  def test_taskwise_and_unsupervised_atlas(self):
    problem = self.problem
    config = adamerging_taskwise.get_config("runlocal")
    config.train.steps = 3
    self.assertEqual(learned.run(problem, config).coeffs.shape, (3, 1))
    config = atlas_unsupervised.get_config("runlocal")
    result = learned.run(problem, config)
    self.assertTrue(result.transductive)  # The reference adapts on the unlabeled test inputs.
    self.assertTrue(result.history["eval"])
    config.adapt_split = "train"
    self.assertFalse(learned.run(problem, config).transductive)

  def test_unknown_method_is_reported(self):
    config = atlas.get_config("runlocal")
    config.method = "atlas"  # A recipe name, not an algorithm.
    with self.assertRaisesRegex(ValueError, "coefficients"):
      learned.run(self.problem, config)

  def test_cache_shares_compilations_between_equal_recipes(self):
    problem = self.problem
    cache = learned.CompileCache()
    config = adamerging.get_config("runlocal")
    config.train.steps = 2
    plus = adamerging_plus.get_config("runlocal")
    plus.train.steps = 2
    first = learned.run(problem, config, cache=cache)
    entries = len(cache)
    learned.run(problem, plus, cache=cache)  # Same step config, another basis.
    self.assertLen(cache, entries)
    again = learned.run(problem, config)  # No cache: a fresh compilation, the same numbers.
    np.testing.assert_array_equal(again.coeffs, first.coeffs)
    config.optim.learning_rate = 0.5
    learned.run(problem, config, cache=cache)
    self.assertLen(cache, entries + 1)

  def _dv_basi(self, module):
    seen_rows = []

    def apply_fn(params, x, task):
      seen_rows.append(x.shape[0])
      return self.raw.apply_fn(params, x, task)

    config = module.get_config("runlocal")
    config.train.epochs = 2
    config.start.train.epochs = 1
    config.start.train.steps = 3
    workdir = self._tempdir()
    problem = self.problem._replace(apply_fn=apply_fn)
    return learned.run(problem, config, workdir=workdir), seen_rows, workdir

  def test_dv_basi_selects_on_validation_and_never_touches_test(self):
    result, seen_rows, workdir = self._dv_basi(dv_basi)
    self.assertNotIn(_NUM_TEST, seen_rows)  # Test inputs never went through the model.
    trajectory = result.extras["trajectory"]
    self.assertLen(trajectory, 3)  # θ^(0), θ^(1), θ^(2).
    self.assertEqual(result.selected, {"m*": int(np.argmax(trajectory))})
    self.assertLen(result.coeffs, result.selected["m*"])
    self.assertFalse(result.transductive)
    # The selected model's own validation metric is the one recorded for its iteration.
    metrics = _val_metrics(self.problem, result.params)
    metric = evaluation.selection_metric(metrics, "accuracy", self.problem.reference_accuracy)
    self.assertEqual(metric, trajectory[result.selected["m*"]])
    self.assertTrue((workdir / "outer_2" / "checkpoints").is_dir())
    self.assertTrue((workdir / "start" / "checkpoints").is_dir())

  def test_dv_basi_unsupervised_adapts_on_test_but_selects_on_validation(self):
    result, seen_rows, _ = self._dv_basi(dv_basi_unsupervised)
    # Adaptation sees test inputs only in training batches; selection never evaluates test.
    self.assertNotIn(_NUM_TEST, seen_rows)
    self.assertTrue(result.transductive)
    self.assertEqual(result.selected["m*"], int(np.argmax(result.extras["trajectory"])))

  def test_plots_write_pngs(self):
    out = self._tempdir()
    coeffs = np.random.default_rng(0).uniform(size=(3, 5))
    history = {"loss": [[1, 2.0], [2, 1.5]], "eval": [[1, 0.5, []], [2, 0.6, []]]}
    paths = [
      plots.plot_coefficients(
        coeffs, [f"layer{i}" for i in range(5)], out / "heat.png", vector_names=["a", "b", "c"]
      ),
      plots.plot_curves(history, out / "curves.png"),
      plots.plot_dv_basi_trajectory(
        [0.5, 0.6, 0.55], out / "dv.png", best_iteration=1, test_metrics=[0.4, 0.5, 0.5]
      ),
    ]
    for path in paths:
      self.assertEqual(path.read_bytes()[:8], b"\x89PNG\r\n\x1a\n")


def _merged_at_init(problem, config):
  basis = bases.make_basis(problem.base, problem.experts, config.basis)
  blocks = learned.make_blocks(problem.base, granularity=config.coefficients.granularity)
  scaling = learned.blockwise_scaling(blocks, init=config.coefficients.init)
  return scaling.merge(scaling.init(problem.base, basis), problem.base, basis)


if __name__ == "__main__":
  absltest.main()
