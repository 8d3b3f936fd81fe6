"""Learned merging methods: one registry, one signature, one result type.

`METHODS` maps `config.method` to an algorithm
`fn(problem: LearnProblem, config, *, workdir=None, cache=None) -> LearnedMerge`:

* "coefficients": learn block-wise Λ over a basis made from the experts, for θ0 + Σ_k Λ_k ⊙ v_k.
  AdaMerging (task-/layer-wise), AdaMerging++ and aTLAS (supervised, unsupervised) are recipes of
  it: one config file each under configs/learned/.
* "dv_basi": DV-BASI's outer loop: restart the search along the difference vector θ^(m−1) − θ0,
  M times, from a start model (another recipe, or a data-free rule).

`run(problem, config)` dispatches on `config.method`. `workdir` makes a run resumable (orbax
checkpoints); `cache` (a `CompileCache` the caller owns, one per problem) shares compilations
between runs whose configs agree; without one each run compiles its own step (DV-BASI still
shares one cache between its start and its outer iterations).
"""

import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from mergejax import rules
from mergejax.learned import bases, evaluation, loop, objectives
from mergejax.learned import parametrizations as params_lib
from mergejax.learned import sharding as sharding_lib
from mergejax.learned import step as step_lib
from mergejax.learned.problem import CompileCache, LearnedMerge, LearnProblem

Workdir = str | pathlib.Path | None


def coefficients(
  problem: LearnProblem, config: Any, *, workdir: Workdir = None, cache: CompileCache | None = None
) -> LearnedMerge:
  """Learns block-wise Λ over the basis `config.basis` makes from the experts.

  Args:
    problem: the `LearnProblem`.
    config: a recipe from configs/learned/ (see adamerging.py for every field).
    workdir: checkpoint directory (resumable); None for no checkpoints.
    cache: shared compilations (see the module docstring).

  Returns:
    The `LearnedMerge`; `extras` holds "blocks" (Λ's column names), "effective_coeffs" (Λ as
    the merge uses it, i.e. clamped), "final_coeffs", "best_step" and "best_metric".
  """
  adapt = problem.splits[config.adapt_split]
  if len(problem.experts) != len(adapt):
    raise ValueError(f"{len(problem.experts)} experts but {len(adapt)} tasks of adaptation data.")
  basis = bases.make_basis(problem.base, problem.experts, config.basis, seed=config.seed)
  result, blocks = _learn_blockwise(problem, config, problem.base, basis, adapt, workdir, cache)
  evaluated = bool(result.history["eval"])
  return LearnedMerge(
    params=result.params,
    coeffs=result.coeffs,
    transductive=config.adapt_split == "test",
    history=result.history,
    selected={"best step" if evaluated else "steps": result.best_step},
    extras=_blockwise_extras(result, blocks, config),
  )


def dv_basi(
  problem: LearnProblem, config: Any, *, workdir: Workdir = None, cache: CompileCache | None = None
) -> LearnedMerge:
  """DV-BASI (Wang et al., AAAI 2026): restart a stagnated search along difference vectors.

  θ^(0) comes from `config.dv_basi.start` ("learned": the recipe `config.start`; else a
  `mergejax.rules` rule with `dv_basi.start_hparams`). For m = 1..M: δ = θ^(m−1) − θ0; learn
  block-wise Λ (fresh init and optimizer state) for θ^(m−1) + Λ ⊙ δ with early stopping on
  validation; θ^(m) = θ^(m−1) + Λ* ⊙ δ. The result is the iterate best on *validation* (θ^(0)
  included; ties keep the earlier one), never chosen on test.

  Args:
    problem: the `LearnProblem`.
    config: configs/learned/dv_basi.py or a variant.
    workdir: checkpoint root: the start run under `workdir/start`, iteration m under
      `workdir/outer_<m>`, so a killed run resumes inside the stage it was in.
    cache: shared compilations; None makes one for this run (the outer iterations share it).

  Returns:
    The `LearnedMerge`; `selected` is {"m*": m*}; `extras` holds "trajectory" (validation metric
    of θ^(0..M)), "best_iteration", "iterations" (per outer iteration: history, coeffs,
    best_step), "blocks" and "start_transductive".
  """
  cache = CompileCache() if cache is None else cache
  root = None if workdir is None else pathlib.Path(workdir)
  start, start_transductive = _start(problem, config, root, cache)
  evaluator = _evaluator(problem, config, cache)

  def validate(params):
    task_metrics = evaluator.metrics(params, problem.splits["validation"])
    return evaluation.selection_metric(
      task_metrics, config.early_stopping.metric, problem.reference_accuracy
    )

  adapt = problem.splits[config.adapt_split]
  current, trajectory = start, [validate(start)]
  best_iteration, best_params = 0, start
  iterations, blocks = [], None
  for m in range(1, config.dv_basi.outer_iterations + 1):
    # Cumulative displacement from θ0; fp32 so repeated iterations do not round in bf16.
    delta = jax.tree.map(
      lambda c, b: c.astype(jnp.float32) - b.astype(jnp.float32), current, problem.base
    )
    outer_dir = None if root is None else root / f"outer_{m}"
    result, blocks = _learn_blockwise(problem, config, current, [delta], adapt, outer_dir, cache)
    current = result.params
    trajectory.append(validate(current))
    iterations.append(
      {"history": result.history, "coeffs": result.coeffs, "best_step": result.best_step}
    )
    logging.info(
      "DV-BASI iteration %d: validation %s = %.5f", m, config.early_stopping.metric, trajectory[-1]
    )
    if trajectory[-1] > trajectory[best_iteration]:
      best_iteration, best_params = m, current
  return LearnedMerge(
    params=best_params,
    coeffs=[it["coeffs"] for it in iterations[:best_iteration]],
    transductive=start_transductive or config.adapt_split == "test",
    history=iterations[-1]["history"] if iterations else {"loss": [], "eval": []},
    selected={"m*": best_iteration},
    extras={
      "trajectory": trajectory,
      "best_iteration": best_iteration,
      "iterations": iterations,
      "blocks": None if blocks is None else list(blocks.names),
      "start_transductive": start_transductive,
    },
  )


METHODS: dict[str, Callable[..., LearnedMerge]] = {
  "coefficients": coefficients,
  "dv_basi": dv_basi,
}


def run(
  problem: LearnProblem, config: Any, *, workdir: Workdir = None, cache: CompileCache | None = None
) -> LearnedMerge:
  """Runs the algorithm `config.method` names: the one entry for benchmarks and launchers.

  Args:
    problem: the `LearnProblem`.
    config: any recipe under configs/learned/.
    workdir: checkpoint root; None for none.
    cache: shared compilations (one per problem), or None.

  Returns:
    The `LearnedMerge`; `.params` is the merged backbone.
  """
  if config.method not in METHODS:
    raise ValueError(f"Unknown learned method {config.method!r}: use one of {sorted(METHODS)}.")
  return METHODS[config.method](problem, config, workdir=workdir, cache=cache)


def _start(problem, config, root, cache):
  """θ^(0) of DV-BASI and whether it was adapted on test inputs."""
  if config.dv_basi.start == "learned":
    start_dir = None if root is None else root / "start"
    result = run(problem, config.start, workdir=start_dir, cache=cache)
    return result.params, result.transductive
  hparams = dict(config.dv_basi.start_hparams)
  return rules.merge(config.dv_basi.start, problem.base, list(problem.experts), **hparams), False


def _learn_blockwise(problem, config, base, basis, adapt, workdir, cache):
  """Trains `blockwise_scaling` Λ over `basis` around `base`; returns (LoopResult, Blocks)."""
  cc = config.coefficients
  blocks = params_lib.make_blocks(base, granularity=cc.granularity, patterns=tuple(cc.patterns))
  parametrization = params_lib.blockwise_scaling(
    blocks, init=cc.init, clamp=tuple(cc.clamp), clamp_mode=cc.clamp_mode
  )
  objective = objectives.make(config.objective)
  optimizer = step_lib.make_optimizer(config.optim)
  mesh = sharding_lib.make_mesh(config)
  placement = None if mesh is None else sharding_lib.Placement(mesh)
  compiled = None
  if cache is not None:
    tc = config.train
    # Everything the jitted step and merge close over, as config values (init is not among them).
    key = (
      "blockwise_step",
      {k: v for k, v in cc.items() if k != "init"},
      config.objective,
      config.optim,
      {k: tc[k] for k in ("batch_size", "batches_per_step", "epoch_length", "mgda")},
      None if placement is None else placement.key(),
    )
    step, merge = cache.get(
      key,
      lambda: (
        step_lib.make_train_step(
          problem.apply_fn,
          parametrization,
          objective,
          optimizer,
          batch_size=tc.batch_size,
          batches_per_step=tc.batches_per_step,
          epoch_length=tc.epoch_length,
          use_mgda=bool(tc.mgda),
          augment=problem.augment,
          placement=placement,
        ),
        jax.jit(parametrization.merge),
      ),
    )
    compiled = step_lib.Compiled(step, merge, _evaluator(problem, config, cache))
  result = loop.train(
    problem.apply_fn,
    base,
    basis,
    adapt,
    config,
    parametrization=parametrization,
    objective=objective,
    optimizer=optimizer,
    val_data=problem.splits.get("validation"),
    reference_accuracy=problem.reference_accuracy,
    augment=problem.augment,
    workdir=workdir,
    compiled=compiled,
    placement=placement,
  )
  return result, blocks


def _evaluator(problem, config, cache):
  size = config.train.eval_batch_size
  return cache.get(
    ("evaluator", size),
    lambda: evaluation.make_evaluator(problem.apply_fn, eval_batch_size=size),
  )


def _blockwise_extras(result, blocks, config):
  best_metric = None if result.best_metric != result.best_metric else result.best_metric  # NaN
  return {
    "blocks": list(blocks.names),
    "effective_coeffs": params_lib.clamp_coefficients(
      result.coeffs, tuple(config.coefficients.clamp)
    ),
    "final_coeffs": result.final_coeffs,
    "best_step": result.best_step,
    "best_metric": best_metric,
  }
