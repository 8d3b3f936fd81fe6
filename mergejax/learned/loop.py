"""The one training loop for learned merging coefficients.

`train` learns the coefficients of any `Parametrization` (`parametrizations.py`) for any basis,
objective (`objectives.py`) and optax optimizer; the coefficients are an opaque pytree to it. It
reads as five phases:

1. Set up: the jitted step, merge and evaluator (`step.make_compiled`, or handed in by the
   caller), the initial state, and the objective's prepared data (e.g. UFM's pseudo-labels).
2. Resume: restore the newest checkpoint of `workdir` that restores, if any, after checking
   that the run's config is the one the checkpoints were made with (`RESUMABLE_FIELDS` may
   differ: e.g. more steps).
3. Train: one jitted call per step (`step.py`) samples each task's batch, builds θ(coeffs) once,
   runs forward and backward on every task, and updates the coefficients.
4. Evaluate and stop early: every `eval_every` steps on the validation data; keep the best.
5. Checkpoint: through `mergejax.io.checkpoint` (the one module importing orbax): the
   `LoopState` (coefficients, optimizer state, step, RNG key data, best-so-far bookkeeping) and the
   history are saved together, so a run killed at any point and restarted gives a result
   bit-identical to an uninterrupted run.

Determinism: the batch of task t at step s is a pure function of (data key, t, s): each task's
epoch e = s // steps_per_epoch draws its permutation from fold_in(fold_in(key, t), e).
Augmentations draw from fold_in(fold_in(key, AUGMENT_STREAM), s), folded with the task, the
sub-batch and the view. Nothing depends on Python iterator state, so a resumed run replays the
same batches.
"""

import json
import math
import pathlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from absl import logging

from mergejax import provenance
from mergejax.io import atomic, checkpoint
from mergejax.learned import evaluation, objectives
from mergejax.learned.parametrizations import Parametrization
from mergejax.learned.problem import Augment
from mergejax.learned.sharding import Placement
from mergejax.learned.step import Compiled, TrainState, make_compiled, steps_per_epoch
from mergejax.tree import Params

Coeffs = Any
Batch = dict[str, jax.Array]
ApplyFn = Callable[[Params, jax.Array, int], jax.Array]


class BestState(NamedTuple):
  """Best-on-validation bookkeeping and early stopping (host-updated, checkpointed)."""

  coeffs: Coeffs
  metric: jax.Array  # float32; -inf before the first evaluation.
  step: jax.Array  # int32
  bad_evals: jax.Array  # int32: evaluations since the last improvement.
  stopped: jax.Array  # int32 (0/1)


class LoopState(NamedTuple):
  train: TrainState
  best: BestState


class LoopResult(NamedTuple):
  """What `train` returns.

  Attributes:
    params: θ(coeffs*) with coeffs* the selected coefficients (best on validation, else the last).
    coeffs: coeffs*.
    final_coeffs: the coefficients after the last step.
    history: {"loss": [[step, loss], ...], "eval": [[step, metric, [task metrics]], ...]}.
    best_step: step of coeffs* (the last step without validation).
    best_metric: validation selection metric of coeffs* (NaN without validation).
  """

  params: Params
  coeffs: Coeffs
  final_coeffs: Coeffs
  history: dict[str, list]
  best_step: int
  best_metric: float


def train(
  apply_fn: ApplyFn,
  base: Params,
  basis: Sequence[Params],
  adapt_data: Sequence[Batch],
  config: Any,
  *,
  parametrization: Parametrization,
  objective: objectives.Objective,
  optimizer: optax.GradientTransformation,
  val_data: Sequence[Batch] | None = None,
  reference_accuracy: Sequence[float] | None = None,
  augment: Augment | None = None,
  workdir: str | pathlib.Path | None = None,
  compiled: Compiled | None = None,
  on_step: Callable[[int], None] | None = None,
  placement: Placement | None = None,
) -> LoopResult:
  """Learns the coefficients of `parametrization`. See the module docstring for the phases.

  Args:
    apply_fn: `logits = apply_fn(params, x, task_index)`; `params` has θ0's structure.
    base: θ0 (for DV-BASI: the current iterate θ^(m−1)).
    basis: frozen vectors shaped like θ0.
    adapt_data: per-task dicts {"x": [n, ...], optionally "y": [n]}: the objective's data.
    config: ConfigDict/dict with `seed`, `train`, `early_stopping`, `ckpt` (see
      configs/learned/adamerging.py); nothing else is read.
    parametrization: how coefficients make θ (`parametrizations.blockwise_scaling`, or your own).
    objective: from `objectives.make`.
    optimizer: optax optimizer over the coefficients.
    val_data: per-task validation dicts for early stopping/selection (never test data).
    reference_accuracy: per-task expert validation accuracies (normalized accuracy).
    augment: the problem's augmentation (objectives with views).
    workdir: directory for checkpoints; None disables checkpointing.
    compiled: jitted pieces from `make_compiled` to reuse; None builds them for this run.
    on_step: called with the finished step number after each step, before its checkpoint is
      written (tests use it to simulate a kill).
    placement: on a mesh (`sharding.Placement`): θ0 and the basis split over "model", the state
      and the data replicated, batches split over "data" (`compiled` must be built with it).

  Returns:
    A `LoopResult`.
  """
  # 1. Set up.
  tc, ec = config.train, config.early_stopping
  rows = tc.batch_size * tc.batches_per_step
  adapt_data = _check_data(adapt_data, rows, objective.needs_labels, "adapt_data")
  if compiled is None:
    compiled = make_compiled(
      apply_fn, parametrization, objective, optimizer, tc, augment=augment, placement=placement
    )
  per_epoch = steps_per_epoch(adapt_data, rows, tc.epoch_length)
  total_steps = tc.epochs * per_epoch if tc.epochs > 0 else tc.steps
  eval_every = per_epoch if tc.eval_every == 0 else tc.eval_every
  evaluating = val_data is not None and tc.eval_every >= 0
  if evaluating:
    needs_labels = ec.metric in ("accuracy", "neg_cross_entropy")
    # Validation labels, when present, are kept for reporting even if selection ignores them.
    val_data = _check_data(val_data, 1, needs_labels, "val_data", keep_labels=True)
  if placement is not None:
    base, basis = placement.model(base), [placement.model(v) for v in basis]
    adapt_data = placement.replicated(adapt_data)
    if evaluating:
      val_data = placement.replicated(val_data)

  coeffs = parametrization.project(parametrization.init(base, basis))
  if placement is not None:
    coeffs = placement.replicated(coeffs)
  if objective.prepare is not None:
    # Targets from the initial model, recomputed identically on resume (no randomness).
    initial = compiled.merge(coeffs, base, basis)
    adapt_data = objective.prepare(
      lambda t, x: compiled.evaluator.logits(initial, t, x), adapt_data
    )
    if placement is not None:
      adapt_data = placement.replicated(adapt_data)
  state = LoopState(
    train=TrainState(
      coeffs=coeffs,
      opt_state=optimizer.init(coeffs),
      step=jnp.zeros([], jnp.int32),
      rng=jax.random.key_data(jax.random.key(config.seed)),
    ),
    best=BestState(
      coeffs=_copy(coeffs),
      metric=jnp.full([], -jnp.inf, jnp.float32),
      step=jnp.zeros([], jnp.int32),
      bad_evals=jnp.zeros([], jnp.int32),
      stopped=jnp.zeros([], jnp.int32),
    ),
  )
  if placement is not None:  # Restored checkpoints land on this mesh, whatever they were saved on.
    state = placement.replicated(state)
  else:
    # Committed to the device, as the step's outputs are: jit keys its executables on whether
    # the inputs are committed, so an uncommitted first state would compile the step twice.
    state = jax.device_put(state, jax.devices()[0])
  history = {"loss": [], "eval": []}

  # 2. Resume.
  manager = None
  if workdir is not None:
    manager = checkpoint.training_manager(workdir, **config.ckpt)
    _check_fingerprint(workdir, config, resuming=manager.latest_step() is not None)
    restored = checkpoint.restore_training_state(manager, state)
    if restored is not None:
      state, history, restored_step = restored
      logging.info("Resumed from step %d in %s.", restored_step, workdir)
  step = int(state.train.step)
  stopped = bool(state.best.stopped)

  try:
    while step < total_steps and not stopped:
      # 3. Train.
      train_state, metrics = compiled.train_step(state.train, base, basis, adapt_data)
      state = state._replace(train=train_state)
      step += 1
      if step % tc.log_every == 0 or step == total_steps:
        history["loss"].append([step, float(metrics["loss"])])

      # 4. Evaluate and stop early.
      if evaluating and (step % eval_every == 0 or step == total_steps):
        params = compiled.merge(state.train.coeffs, base, basis)
        task_metrics = compiled.evaluator.metrics(params, val_data)
        metric = evaluation.selection_metric(task_metrics, ec.metric, reference_accuracy)
        history["eval"].append([step, metric, task_metrics])
        best = state.best
        if metric > float(best.metric):
          best = best._replace(
            coeffs=_copy(state.train.coeffs),
            metric=jnp.asarray(metric, jnp.float32),
            step=jnp.asarray(step, jnp.int32),
            bad_evals=jnp.zeros([], jnp.int32),
          )
        else:
          bad = int(best.bad_evals) + 1
          stopped = 0 < ec.patience <= bad
          best = best._replace(
            bad_evals=jnp.asarray(bad, jnp.int32), stopped=jnp.asarray(stopped, jnp.int32)
          )
        state = state._replace(best=best)
      if on_step is not None:
        on_step(step)

      # 5. Checkpoint (the policy skips most steps; the last one is always written).
      if manager is not None:
        checkpoint.save_training_state(
          manager, step, state, history, force=step == total_steps or stopped
        )
  finally:
    if manager is not None:
      manager.close()

  final_coeffs = state.train.coeffs
  if evaluating and history["eval"]:
    chosen, best_step = state.best.coeffs, int(state.best.step)
    best_metric = float(state.best.metric)
  else:
    chosen, best_step, best_metric = final_coeffs, step, math.nan
  return LoopResult(
    params=compiled.merge(chosen, base, basis),
    coeffs=chosen,
    final_coeffs=final_coeffs,
    history=history,
    best_step=best_step,
    best_metric=best_metric,
  )


# Config fields that may change when a run resumes: its length, logging, checkpoint cadence,
# evaluation batch size (speed only), the table label, and the devices it runs on.
RESUMABLE_FIELDS = (
  "train.steps",
  "train.epochs",
  "train.log_every",
  "train.eval_batch_size",
  "ckpt.*",
  "label",
  "table_rank",
  "mesh.*",  # Checkpoints restore onto any mesh (a resumed run may use other devices).
  "distributed.*",
)
_FINGERPRINT = "config_fingerprint.json"


def _check_fingerprint(workdir: str | pathlib.Path, config: Any, *, resuming: bool) -> None:
  """Refuses to resume checkpoints made with another config; records the config otherwise."""
  path = pathlib.Path(workdir) / _FINGERPRINT
  current = provenance.config_fingerprint(config, ignore=RESUMABLE_FIELDS)
  if resuming:
    if not path.exists():
      raise ValueError(
        f"{workdir} holds checkpoints but no {_FINGERPRINT}: it cannot be checked against this "
        "run's config. Start afresh with another --workdir (or delete its checkpoints/)."
      )
    diff = provenance.fingerprint_diff(json.loads(path.read_text()), current)
    if diff:
      raise ValueError(
        f"{workdir} holds checkpoints of a run with another config; differing fields: "
        f"{diff}. Resume with the same config (only {list(RESUMABLE_FIELDS)} may change), or "
        "start afresh with another --workdir (or delete its checkpoints/)."
      )
    return
  if jax.process_index() == 0:  # One writer per file in a multi-host run.
    atomic.write_text(path, json.dumps(current, indent=2, sort_keys=True))


def _copy(tree: Any) -> Any:
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def _num_examples(task_data: Batch) -> int:
  return int(jax.tree.leaves(task_data)[0].shape[0])


def _check_data(
  data: Sequence[Batch],
  min_examples: int,
  needs_labels: bool,
  what: str,
  *,
  keep_labels: bool = False,
) -> tuple[Batch, ...]:
  out = []
  for task, task_data in enumerate(data):
    if "x" not in task_data:
      raise ValueError(f'{what}[{task}] has no "x".')
    if needs_labels and "y" not in task_data:
      raise ValueError(f'{what}[{task}] needs labels "y" for this objective/metric.')
    if _num_examples(task_data) < min_examples:
      raise ValueError(f"{what}[{task}] has fewer than {min_examples} examples.")
    # Labels reach the loss only when the objective needs them: an unsupervised method cannot
    # read "y" even if the caller's dicts carry it.
    keys = ("x", "y") if needs_labels or (keep_labels and "y" in task_data) else ("x",)
    out.append({k: jnp.asarray(task_data[k]) for k in keys})
  return tuple(out)
