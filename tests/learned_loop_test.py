"""Tests for mergejax.learned.loop and step: sampling, the step, early stopping, bit-identical
resume, and parametrizations that plug into the loop unchanged."""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

from configs.learned import adamerging
from mergejax.benchmarks import synthetic
from mergejax.learned import evaluation, loop, objectives, parametrizations
from mergejax.learned import problem as learned_problem
from mergejax.learned import step as step_lib

_SAVED_FLAG = None


def setUpModule():
  # Compilation dominates these tests on CPU; XLA's optimizations buy nothing at these sizes.
  global _SAVED_FLAG
  _SAVED_FLAG = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)


def tearDownModule():
  jax.config.update("jax_disable_most_optimizations", _SAVED_FLAG)


class _Killed(Exception):
  """Stands in for a preemption: raised between a step and its checkpoint."""


def _problem():
  return synthetic.make_problem(1, num_tasks=2, hidden=16, num_train=48, num_val=24, num_test=24)


def _config(**train):
  config = adamerging.get_config("runlocal")
  config.optim = dict(name="adamw", learning_rate=0.05, weight_decay=0.1, clip_norm=1.0)
  config.train.update(dict(batch_size=8, steps=12, eval_every=3, log_every=1))
  config.train.update(train)
  config.early_stopping = dict(metric="accuracy", patience=0)
  config.ckpt = dict(every_steps=4, keep=2)
  return config


def _basis(problem):
  return [jax.tree.map(jnp.subtract, e, problem.base) for e in problem.experts]


def _train(problem, config, basis, parametrization, data, **kwargs):
  return loop.train(
    problem.apply_fn,
    problem.base,
    basis,
    data,
    config,
    parametrization=parametrization,
    objective=objectives.make(config.objective),
    optimizer=step_lib.make_optimizer(config.optim),
    **kwargs,
  )


def _scaling(problem, config):
  cc = config.coefficients
  blocks = parametrizations.make_blocks(problem.base, granularity=cc.granularity)
  return parametrizations.blockwise_scaling(blocks, init=cc.init, clamp=tuple(cc.clamp))


def _state(coeffs, opt):
  return step_lib.TrainState(
    coeffs=jnp.array(coeffs, copy=True),  # Fresh copies: the step donates its state.
    opt_state=opt.init(coeffs),
    step=jnp.zeros([], jnp.int32),
    rng=jax.random.key_data(jax.random.key(0)),
  )


def _run(problem, config, workdir=None, kill_at=None, sigkill=False):

  def on_step(step):
    if step == kill_at:
      if sigkill:  # A real kill: no exception handlers, no `finally`, no orbax close().
        os.kill(os.getpid(), signal.SIGKILL)
      raise _Killed()

  return _train(
    problem,
    config,
    _basis(problem),
    _scaling(problem, config),
    problem.test,
    val_data=problem.val,
    workdir=workdir,
    on_step=on_step,
  )


class SamplingTest(absltest.TestCase):
  def test_each_epoch_is_a_permutation_and_depends_only_on_step(self):
    data = [{"x": jnp.arange(12)}, {"x": jnp.arange(7) + 100}]
    key = jax.random.key(3)
    sample = jax.jit(lambda s: step_lib.sample_batches(key, s, data, 3))
    epoch0 = np.concatenate([np.asarray(sample(jnp.int32(s))[0]["x"]) for s in range(4)])
    np.testing.assert_array_equal(np.sort(epoch0), np.arange(12))
    # Task 1 has 7 examples: 2 batches per epoch, its own epochs, one example dropped per epoch.
    task1 = np.concatenate([np.asarray(sample(jnp.int32(s))[1]["x"]) for s in range(2)])
    self.assertLen(set(task1.tolist()), 6)
    epoch1 = np.concatenate([np.asarray(sample(jnp.int32(s))[0]["x"]) for s in range(4, 8)])
    self.assertFalse(np.array_equal(epoch0, epoch1))  # Reshuffled each epoch.
    np.testing.assert_array_equal(sample(jnp.int32(5))[0]["x"], sample(jnp.int32(5))[0]["x"])
    self.assertEqual(step_lib.steps_per_epoch(data, 3), 4)


class OptimizerTest(absltest.TestCase):
  def test_make_optimizer(self):
    params = jnp.ones(3)
    for optim in (
      dict(name="adam", learning_rate=0.1),
      dict(name="adamw", learning_rate=0.1, weight_decay=0.1, clip_norm=1.0),
      dict(name="sgd", learning_rate=0.1, weight_decay=0.01),
    ):
      opt = step_lib.make_optimizer(optim)
      updates, _ = opt.update(jnp.ones(3), opt.init(params), params)
      self.assertTrue(np.all(np.asarray(updates) < 0), optim)
    with self.assertRaises(ValueError):
      step_lib.make_optimizer(dict(name="lion", learning_rate=0.1))


class TrainStepTest(parameterized.TestCase):
  def _step(self, use_mgda):
    problem = _problem()
    basis = _basis(problem)
    blocks = parametrizations.make_blocks(problem.base, granularity="layer")
    scaling = parametrizations.blockwise_scaling(blocks, init=0.3, clamp=(0.0, 1.0))
    opt = optax.adam(0.05)
    step = step_lib.make_train_step(
      problem.apply_fn, scaling, objectives.entropy(), opt, batch_size=8, use_mgda=use_mgda
    )
    state = _state(scaling.init(problem.base, basis), opt)
    data = tuple({"x": d["x"]} for d in problem.test)
    losses = []
    for _ in range(15):
      state, metrics = step(state, problem.base, basis, data)
      losses.append(float(metrics["loss"]))
    return state, metrics, losses

  @parameterized.parameters(False, True)
  def test_scanned_and_unrolled_tasks_agree(self, use_mgda):
    # Equal input shapes take the lax.scan path; reshaping task 1's inputs forces the unrolled
    # Python loop over tasks. Both must give the same losses and update.
    problem = _problem()
    basis = _basis(problem)
    blocks = parametrizations.make_blocks(problem.base, granularity="layer")
    scaling = parametrizations.blockwise_scaling(blocks)
    opt = optax.sgd(1.0)

    def apply_fn(params, x, task):
      return problem.apply_fn(params, x.reshape(x.shape[0], -1), task)

    step = step_lib.make_train_step(
      apply_fn, scaling, objectives.entropy(), opt, batch_size=8, use_mgda=use_mgda
    )
    coeffs = scaling.init(problem.base, basis)
    results = []
    for reshape in (False, True):
      data = [{"x": d["x"]} for d in problem.test]
      if reshape:
        data[1] = {"x": data[1]["x"].reshape(-1, 2, data[1]["x"].shape[1] // 2)}
      results.append(step(_state(coeffs, opt), problem.base, basis, tuple(data)))
    (scanned, m_scanned), (unrolled, m_unrolled) = results
    np.testing.assert_allclose(m_scanned["task_losses"], m_unrolled["task_losses"], rtol=1e-5)
    np.testing.assert_allclose(scanned.coeffs, unrolled.coeffs, rtol=1e-4, atol=1e-6)
    self.assertFalse(np.allclose(scanned.coeffs, coeffs))

  def test_a_traced_task_index_gives_the_switch_path_results(self):
    # Per-task heads indexed by a Python int (one lax.switch branch per task) or by the traced
    # index (one program for all): equal losses and updates; the evaluator traces once.
    problem = _problem()
    basis = _basis(problem)
    scaling = parametrizations.blockwise_scaling(
      parametrizations.make_blocks(problem.base, granularity="layer")
    )
    opt = optax.sgd(1.0)
    classes = problem.test[0]["y"].max() + 1
    heads = jax.random.normal(jax.random.key(3), (len(problem.experts), 4, 4))[:, :classes, :]

    def apply(params, x, task):  # Task 0's logits, read out by a per-task linear head.
      return problem.apply_fn(params, x, 0) @ heads[task]

    data = tuple({"x": d["x"]} for d in problem.test)
    coeffs = scaling.init(problem.base, basis)
    results = []
    for fn in (apply, learned_problem.TracedTaskApply(apply)):
      step = step_lib.make_train_step(fn, scaling, objectives.entropy(), opt, batch_size=8)
      results.append(step(_state(coeffs, opt), problem.base, basis, data))
    (switched, m_switched), (traced, m_traced) = results
    np.testing.assert_allclose(m_switched["task_losses"], m_traced["task_losses"], rtol=1e-6)
    np.testing.assert_allclose(switched.coeffs, traced.coeffs, rtol=1e-6, atol=1e-7)
    self.assertFalse(np.allclose(traced.coeffs, coeffs))
    once = learned_problem.TracedTaskApply(chex.assert_max_traces(apply, n=1))
    metrics = evaluation.make_evaluator(once).metrics(problem.base, problem.val)
    expected = evaluation.make_evaluator(apply).metrics(problem.base, problem.val)
    for got, want in zip(metrics, expected, strict=True):
      np.testing.assert_allclose(got["accuracy"], want["accuracy"])

  def test_entropy_decreases_and_coefficients_stay_clamped(self):
    state, _, losses = self._step(use_mgda=False)
    self.assertLess(np.mean(losses[-3:]), np.mean(losses[:3]))
    self.assertEqual(int(state.step), 15)
    self.assertTrue(np.all((np.asarray(state.coeffs) >= 0) & (np.asarray(state.coeffs) <= 1)))

  def test_mgda_weights_are_on_the_simplex(self):
    _, metrics, losses = self._step(use_mgda=True)
    weights = np.asarray(metrics["task_weights"])
    self.assertTrue(np.all(weights >= 0))
    np.testing.assert_allclose(weights.sum(), 1.0, atol=1e-5)
    self.assertLess(np.mean(losses[-3:]), np.mean(losses[:3]))


class LearnCoefficientsTest(absltest.TestCase):
  def _tempdir(self):
    # absltest's create_tempdir needs parsed absl flags, which pytest does not provide.
    path = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return pathlib.Path(path)

  def test_resume_after_a_kill_is_bit_identical(self):
    problem = _problem()
    config = _config()
    reference = _run(problem, config, workdir=self._tempdir())

    workdir = self._tempdir()
    # Killed after step 8, before its checkpoint is written (the last one is 4); then a
    # leftover partial save.
    with self.assertRaises(_Killed):
      _run(problem, config, workdir=workdir, kill_at=8)
    self.assertEqual(sorted(p.name for p in (workdir / "checkpoints").iterdir()), ["4"])
    # Restart as a fresh process would: nothing compiled is reused.
    jax.clear_caches()
    partial = workdir / "checkpoints" / "8.orbax-checkpoint-tmp-123"
    partial.mkdir()
    (partial / "garbage").write_text("half-written")
    resumed = _run(problem, config, workdir=workdir)

    chex.assert_trees_all_equal(resumed.coeffs, reference.coeffs)
    chex.assert_trees_all_equal(resumed.final_coeffs, reference.final_coeffs)
    chex.assert_trees_all_equal(resumed.params, reference.params)
    self.assertEqual(resumed.history, reference.history)
    self.assertEqual(resumed.best_step, reference.best_step)
    self.assertLen(reference.history["eval"], 4)
    # The run moved, so equality is not trivially between two initial states.
    self.assertFalse(np.array_equal(reference.final_coeffs, jnp.full_like(reference.coeffs, 0.3)))

    # A finished run restarts into its final checkpoint and returns the same result, no steps.
    again = _run(problem, config, workdir=workdir, kill_at=1)
    chex.assert_trees_all_equal(again.coeffs, reference.coeffs)

  def test_resume_refuses_another_config_but_takes_more_steps(self):
    problem = _problem()
    workdir = self._tempdir()
    with self.assertRaises(_Killed):
      _run(problem, _config(), workdir=workdir, kill_at=6)
    changed = _config()
    changed.seed = 1
    with self.assertRaisesRegex(ValueError, r"another config.*'seed: 0 -> 1'.*another --workdir"):
      _run(problem, changed, workdir=workdir)
    regrouped = _config()
    regrouped.coefficients.granularity = "task"
    with self.assertRaisesRegex(ValueError, r"coefficients.granularity: 'layer' -> 'task'"):
      _run(problem, regrouped, workdir=workdir)
    # A longer run of the same config resumes: it equals an uninterrupted longer run.
    longer = _run(problem, _config(steps=16), workdir=workdir)
    reference = _run(problem, _config(steps=16), workdir=self._tempdir())
    chex.assert_trees_all_equal(longer.final_coeffs, reference.final_coeffs)
    self.assertEqual(longer.history, reference.history)

  def test_a_corrupted_latest_checkpoint_falls_back_to_the_one_before(self):
    problem = _problem()
    reference = _run(problem, _config(), workdir=self._tempdir())
    workdir = self._tempdir()
    with self.assertRaises(_Killed):
      _run(problem, _config(), workdir=workdir, kill_at=11)  # Checkpoints at 4 and 8.
    latest = workdir / "checkpoints" / "8"
    victim = max((p for p in latest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.unlink()  # A file deleted inside the newest checkpoint.
    with self.assertLogs(level="WARNING") as logs:
      resumed = _run(problem, _config(), workdir=workdir)
    self.assertTrue(any("step 8" in line and "does not restore" in line for line in logs.output))
    self.assertTrue(any("Resuming from step 4" in line for line in logs.output))
    chex.assert_trees_all_equal(resumed.final_coeffs, reference.final_coeffs)
    self.assertEqual(resumed.history, reference.history)

  def test_resume_after_sigkill_in_another_process_is_bit_identical(self):
    problem = _problem()
    config = _config()
    reference = _run(problem, config)
    workdir = self._tempdir()
    child = subprocess.run(
      [sys.executable, __file__],
      env=dict(os.environ, LEARNED_LOOP_KILL_CHILD=str(workdir)),
      capture_output=True,
      timeout=120,
    )
    self.assertEqual(child.returncode, -signal.SIGKILL, child.stderr.decode()[-2000:])
    self.assertEqual(sorted(p.name for p in (workdir / "checkpoints").iterdir()), ["4", "8"])
    resumed = _run(problem, config, workdir=workdir)
    chex.assert_trees_all_equal(resumed.coeffs, reference.coeffs)
    chex.assert_trees_all_equal(resumed.final_coeffs, reference.final_coeffs)
    self.assertEqual(resumed.history, reference.history)

  def test_early_stopping_and_best_selection(self):
    problem = _problem()
    config = _config(steps=60, eval_every=2)
    # Large lr + weight decay: validation accuracy plateaus, patience 2 must stop the run.
    config.optim = dict(name="adam", learning_rate=0.3, weight_decay=0.0, clip_norm=0.0)
    config.early_stopping.patience = 2
    result = _run(problem, config)
    evals = result.history["eval"]
    self.assertLess(evals[-1][0], 60)  # Stopped early.
    metrics = [e[1] for e in evals]
    best = int(np.argmax(metrics))  # First maximum: later ties do not replace it.
    self.assertEqual(result.best_step, evals[best][0])
    self.assertEqual(result.best_metric, np.float32(metrics[best]))
    # The two evaluations after the best were not better, and the run stopped right there.
    self.assertEqual(len(evals) - 1 - best, 2)

  def test_labels_never_reach_an_unsupervised_objective(self):
    problem = _problem()
    seen = []

    def apply_fn(params, x, task):
      seen.append(x.shape)
      return problem.apply_fn(params, x, task)

    config = _config(steps=2, eval_every=-1)
    # Poisoned labels: out-of-range class ids would make a cross-entropy NaN if they were used.
    poisoned = [dict(d, y=jnp.full_like(d["y"], 10**6)) for d in problem.train]
    result = loop.train(
      apply_fn,
      problem.base,
      _basis(problem),
      poisoned,
      config,
      parametrization=_scaling(problem, config),
      objective=objectives.entropy(),
      optimizer=optax.adam(0.05),
    )
    self.assertTrue(all(np.isfinite(v) for _, v in result.history["loss"]))
    self.assertTrue(seen)


def _low_rank_scaling(blocks, rank):
  """Λ = U Vᵀ (U [K, r], V [blocks, r]), every entry 0.3 at init."""
  scale = (0.3 / rank) ** 0.5

  def init(base, basis):
    del base
    return {
      "u": jnp.full((len(basis), rank), scale, jnp.float32),
      "v": jnp.full((blocks.num_blocks, rank), scale, jnp.float32),
    }

  def merge(coeffs, base, basis):
    return parametrizations.merge_blockwise(coeffs["u"] @ coeffs["v"].T, base, basis, blocks)

  return parametrizations.Parametrization(init, merge)


def _mask_scaling():
  """θ0 + Σ_k sigmoid(m_k) ⊙ v_k with one logit per entry of every basis vector."""

  def init(base, basis):
    return [jax.tree.map(jnp.zeros_like, v) for v in basis]

  def merge(coeffs, base, basis):
    terms = [
      jax.tree.map(lambda m, v: jax.nn.sigmoid(m) * v, c, v)
      for c, v in zip(coeffs, basis, strict=True)
    ]
    return jax.tree.map(lambda b, *ts: b + sum(ts), base, *terms)

  return parametrizations.Parametrization(init, merge)


class PluggedParametrizationTest(parameterized.TestCase):
  """New parametrizations (pytree coefficients) train in the unchanged loop, MGDA included."""

  @parameterized.named_parameters(
    ("low_rank", "low_rank", False),
    ("low_rank_mgda", "low_rank", True),
    ("mask", "mask", False),
    ("mask_mgda", "mask", True),
  )
  def test_trains_in_the_loop(self, kind, use_mgda):
    problem = _problem()
    config = _config(steps=10, eval_every=5)
    config.train.mgda = use_mgda
    basis = _basis(problem)
    if kind == "low_rank":
      blocks = parametrizations.make_blocks(problem.base, granularity="layer")
      parametrization = _low_rank_scaling(blocks, rank=1)
    else:
      parametrization = _mask_scaling()
    init = parametrization.init(problem.base, basis)
    result = _train(problem, config, basis, parametrization, problem.test, val_data=problem.val)
    chex.assert_trees_all_equal_structs(result.final_coeffs, init)
    chex.assert_trees_all_equal_shapes_and_dtypes(result.params, problem.base)
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), result.final_coeffs, init)
    self.assertGreater(max(jax.tree.leaves(moved)), 0.0)
    self.assertLen(result.history["eval"], 2)
    if kind == "low_rank":  # The learned Λ keeps rank 1.
      lam = np.asarray(result.final_coeffs["u"] @ result.final_coeffs["v"].T)
      self.assertEqual(np.linalg.matrix_rank(lam, tol=1e-5), 1)


if __name__ == "__main__":
  if "LEARNED_LOOP_KILL_CHILD" in os.environ:
    # Child of the SIGKILL test: checkpoints at 4 and 8, killed after step 10.
    setUpModule()
    _run(
      _problem(), _config(), workdir=os.environ["LEARNED_LOOP_KILL_CHILD"], kill_at=10, sigkill=True
    )
  else:
    absltest.main()
