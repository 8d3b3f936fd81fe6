"""Tests for mergejax.learned.methods, objectives, configs and plots on tiny synthetic tasks."""

import importlib
import pathlib
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from configs import (
  adamerging,
  adamerging_plus,
  adamerging_taskwise,
  atlas,
  atlas_unsupervised,
  dv_basi,
  dv_basi_unsupervised,
)
from mergejax.benchmarks import synthetic
from mergejax.benchmarks.common import learned_plots as plots
from mergejax.learned import (
  loop,
  methods,
  objectives,
)

_NUM_TEST = 40  # No other split or batch has this many rows: calls with it touch test data.


def _problem():
  return synthetic.make_problem(
    2, num_tasks=3, hidden=16, num_train=48, num_val=32, num_test=_NUM_TEST
  )


def _splits(problem):
  return {"train": problem.train, "validation": problem.val, "test": problem.test}


def _val_metrics(problem, params):
  evaluate = loop.make_params_evaluator(problem.apply_fn)
  return evaluate(params, problem.val)


_SAVED_FLAG = None


def setUpModule():
  # Compilation dominates these tests on CPU; XLA's optimizations buy nothing at these sizes.
  global _SAVED_FLAG
  _SAVED_FLAG = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)


def tearDownModule():
  jax.config.update("jax_disable_most_optimizations", _SAVED_FLAG)


class ObjectivesTest(absltest.TestCase):
  def test_entropy_cross_entropy_pseudo_label(self):
    uniform = jnp.zeros((2, 4))
    np.testing.assert_allclose(objectives.entropy(uniform), np.log(4), rtol=1e-6)
    confident = jnp.array([[20.0, 0.0, 0.0], [0.0, 0.1, 0.0]])
    batch = {"y": jnp.array([0, 2])}
    per_example = -jax.nn.log_softmax(confident)[jnp.arange(2), batch["y"]]
    np.testing.assert_allclose(
      objectives.cross_entropy(confident, batch), per_example.mean(), rtol=1e-6
    )
    # Only the first row is confident (>= 0.99): its CE against its own argmax, over batch size 2.
    expected = -jax.nn.log_softmax(confident[0])[0] / 2
    got = objectives.pseudo_label_cross_entropy(confident, threshold=0.99)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    self.assertEqual(float(objectives.pseudo_label_cross_entropy(uniform, threshold=0.99)), 0.0)
    np.testing.assert_allclose(objectives.accuracy(confident, batch), 0.5)

  def test_get_objective(self):
    self.assertFalse(objectives.get_objective("entropy").needs_labels)
    self.assertTrue(objectives.get_objective("cross_entropy").needs_labels)
    self.assertFalse(objectives.get_objective("pseudo_label", threshold=0.5).needs_labels)
    with self.assertRaises(ValueError):
      objectives.get_objective("mse")
    with self.assertRaises(ValueError):
      objectives.get_objective("entropy", threshold=0.5)


class ConfigsTest(parameterized.TestCase):
  @parameterized.named_parameters(
    ("adamerging", adamerging, "adamerging", "test", "layer", 0.3),
    ("adamerging_taskwise", adamerging_taskwise, "adamerging", "test", "task", 0.3),
    ("adamerging_plus", adamerging_plus, "adamerging_plus", "test", "layer", 0.3),
    ("atlas", atlas, "atlas", "validation", "layer", 0.0),
    ("atlas_unsupervised", atlas_unsupervised, "atlas", "train", "layer", 0.0),
    ("dv_basi", dv_basi, "dv_basi", "validation", "layer", 0.1),
    ("dv_basi_unsupervised", dv_basi_unsupervised, "dv_basi", "test", "layer", 0.1),
  )
  def test_paper_recipes(self, module, method, split, granularity, init):
    full, small = module.get_config(), module.get_config("runlocal")
    for config in (full, small):
      self.assertEqual(config.method, method)
      self.assertEqual(config.adapt_split, split)
      self.assertEqual(config.coefficients.granularity, granularity)
      self.assertEqual(config.coefficients.init, init)
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
    self.assertEqual(config.start.method, "atlas")
    self.assertEqual(dv_basi_unsupervised.get_config().start.method, "adamerging")
    self.assertEqual(
      adamerging_plus.get_config().basis.to_dict(), dict(name="ties_trimmed", density=0.2)
    )


class MethodsTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.problem = _problem()

  def _tempdir(self):
    path = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return pathlib.Path(path)

  def test_atlas_supervised_improves_validation_over_pretrained(self):
    problem = self.problem
    config = atlas.get_config("runlocal")
    config.train.epochs = 4
    config.optim.learning_rate = 0.05
    result = methods.run(problem.apply_fn, problem.base, problem.experts, _splits(problem), config)
    before = _val_metrics(problem, problem.base)
    after = _val_metrics(problem, result.params)
    self.assertLess(
      np.mean([m["cross_entropy"] for m in after]), np.mean([m["cross_entropy"] for m in before])
    )
    self.assertFalse(result.transductive)
    # Selection is the best validation evaluation.
    evals = result.history["eval"]
    self.assertEqual(result.best_step, evals[int(np.argmax([e[1] for e in evals]))][0])

  def test_adamerging_lowers_test_entropy_and_is_transductive(self):
    problem = self.problem
    config = adamerging.get_config("runlocal")
    config.optim.learning_rate = 0.05
    result = methods.adamerging(
      problem.apply_fn, problem.base, problem.experts, problem.test, config
    )
    self.assertTrue(result.transductive)
    evaluate = loop.make_evaluator(problem.apply_fn, result.blocks)
    basis = methods.make_basis(problem.base, problem.experts, config.basis)
    init = jnp.full_like(result.coeffs, 0.3)
    before = evaluate(init, problem.base, basis, problem.test)
    after = evaluate(result.coeffs, problem.base, basis, problem.test)
    self.assertLess(np.mean([m["entropy"] for m in after]), np.mean([m["entropy"] for m in before]))
    coeffs = np.asarray(result.coeffs)
    self.assertEqual(coeffs.shape, (3, len(result.blocks.names)))
    self.assertTrue(np.all((coeffs >= 0) & (coeffs <= 1)))

  def test_adamerging_plus_uses_a_trimmed_basis(self):
    problem = self.problem
    config = adamerging_plus.get_config("runlocal")
    config.train.steps = 3
    basis = methods.make_basis(problem.base, problem.experts, config.basis)
    for vector in basis:
      leaves = jax.tree.leaves(vector)
      kept = sum(int(jnp.count_nonzero(x)) for x in leaves) / sum(x.size for x in leaves)
      self.assertAlmostEqual(kept, 0.2, delta=0.01)
    result = methods.run(problem.apply_fn, problem.base, problem.experts, _splits(problem), config)
    self.assertTrue(result.transductive)
    dare = methods.make_basis(problem.base, problem.experts, dict(name="dare", density=0.5))
    vectors = methods.make_basis(problem.base, problem.experts, dict(name="task_vectors"))
    for d, v in zip(jax.tree.leaves(dare), jax.tree.leaves(vectors), strict=True):
      np.testing.assert_allclose(d[d != 0], 2.0 * v[d != 0], rtol=1e-6)  # Rescaled by 1/0.5.
    with self.assertRaises(ValueError):
      methods.adamerging_plus(
        problem.apply_fn,
        problem.base,
        problem.experts,
        problem.test,
        adamerging.get_config("runlocal"),
      )

  def test_taskwise_and_unsupervised_atlas(self):
    problem = self.problem
    config = adamerging_taskwise.get_config("runlocal")
    config.train.steps = 3
    result = methods.run(problem.apply_fn, problem.base, problem.experts, _splits(problem), config)
    self.assertEqual(result.coeffs.shape, (3, 1))
    config = atlas_unsupervised.get_config("runlocal")
    config.objective.threshold = 0.5  # Tiny untrained heads are rarely 99% sure.
    result = methods.run(problem.apply_fn, problem.base, problem.experts, _splits(problem), config)
    self.assertFalse(result.transductive)
    self.assertTrue(result.history["eval"])

  def _dv_basi(self, module):
    problem = self.problem
    seen_rows = []

    def apply_fn(params, x, task):
      seen_rows.append(x.shape[0])
      return problem.apply_fn(params, x, task)

    config = module.get_config("runlocal")
    config.train.epochs = 2
    config.start.train.epochs = 1
    config.start.train.steps = 3
    workdir = self._tempdir()
    result = methods.run(
      apply_fn, problem.base, problem.experts, _splits(problem), config, workdir=workdir
    )
    return result, seen_rows, workdir

  def test_dv_basi_selects_on_validation_and_never_touches_test(self):
    result, seen_rows, workdir = self._dv_basi(dv_basi)
    self.assertNotIn(_NUM_TEST, seen_rows)  # Test inputs never went through the model.
    self.assertLen(result.val_metrics, 3)  # θ^(0), θ^(1), θ^(2).
    self.assertEqual(result.best_iteration, int(np.argmax(result.val_metrics)))
    self.assertFalse(result.transductive)
    # The selected model's own validation metric is the one recorded for its iteration.
    metric = loop.selection_metric(_val_metrics(self.problem, result.params), "accuracy")
    self.assertEqual(metric, result.val_metrics[result.best_iteration])
    self.assertTrue((workdir / "outer_2" / "checkpoints").is_dir())
    self.assertTrue((workdir / "start" / "checkpoints").is_dir())

  def test_dv_basi_unsupervised_adapts_on_test_but_selects_on_validation(self):
    result, seen_rows, _ = self._dv_basi(dv_basi_unsupervised)
    # Adaptation sees test inputs only in training batches; selection never evaluates test.
    self.assertNotIn(_NUM_TEST, seen_rows)
    self.assertTrue(result.transductive)
    self.assertEqual(result.best_iteration, int(np.argmax(result.val_metrics)))

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


def test_configs_import_as_modules():
  # launch/learn_merge.py loads configs by path; variants import their base as `configs.<name>`.
  for name in ("adamerging_taskwise", "dv_basi_unsupervised"):
    importlib.import_module(f"configs.{name}").get_config("runlocal").lock()


if __name__ == "__main__":
  absltest.main()
