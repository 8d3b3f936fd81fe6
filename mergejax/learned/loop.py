"""The one training loop for learned merging coefficients.

`learn_coefficients` trains Λ of θ(Λ) = θ0 + Σ_k Λ_k ⊙ v_k (see `coefficients.py`) for any basis,
granularity, objective and optax optimizer. It reads as five phases:

1. Set up: blocks, objective, optimizer, the jitted step and the evaluator.
2. Resume: restore the newest checkpoint of `workdir`, if any.
3. Train: one jitted call per step does everything: sample each task's batch from the
   device-resident data, build θ(Λ) once, forward and backward every task (a `lax.scan` over
   tasks when their batches share shapes, so memory does not grow with the number of tasks),
   map θ's cotangent to Λ, optimizer update, clamp.
4. Evaluate and stop early: every `eval_every` steps on the validation data; keep the best Λ.
5. Checkpoint: orbax CheckpointManager; Λ, optimizer state, step, RNG key data, the best-so-far
   bookkeeping and the history are saved together, so a run killed at any point and restarted
   gives a result bit-identical to an uninterrupted run.

Determinism: the batch of task t at step s is a pure function of (data key, t, s): each task's
epoch e = s // steps_per_epoch_t draws its permutation from fold_in(fold_in(key, t), e). Nothing
depends on Python iterator state, so replaying from a checkpoint replays the same batches.

Orbax is used here directly (CheckpointManager); `mergejax.checkpoint` offers only one-shot
save/load helpers, which do not cover a rotating, resumable training checkpoint.
"""

import functools
import math
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from mergejax.io import checkpoint
from mergejax.learned import coefficients as coefficients_lib
from mergejax.learned import mgda, objectives

Params = Any
Batch = dict[str, jax.Array]
ApplyFn = Callable[[Params, jax.Array, int], jax.Array]

SELECTION_METRICS = ("accuracy", "neg_entropy", "neg_cross_entropy")


class LearnResult(NamedTuple):
  """What `learn_coefficients` returns.

  Attributes:
    params: θ(Λ*) with Λ* the selected coefficients (best on validation, else the last).
    coeffs: Λ*, float32 `[num_vectors, num_blocks]`.
    final_coeffs: Λ after the last step (equal to `coeffs` without validation).
    blocks: the block assignment (names of Λ's columns).
    history: {"loss": [[step, loss], ...], "eval": [[step, metric, {task metrics}], ...]}.
    best_step: step of Λ* (the last step without validation).
    best_metric: validation selection metric of Λ* (NaN without validation).
    transductive: True when Λ was adapted on unlabeled *test* inputs (config.adapt_split ==
      "test"); reports must say so.
  """

  params: Params
  coeffs: jax.Array
  final_coeffs: jax.Array
  blocks: coefficients_lib.Blocks
  history: dict[str, list]
  best_step: int
  best_metric: float
  transductive: bool


def make_optimizer(optim: Mapping[str, Any]) -> optax.GradientTransformation:
  """Builds the optax optimizer named in the config.

  Equal configs give the identical (cached) optimizer object, so `make_train_step`'s cache and
  jit's compilation cache are hit across runs (DV-BASI's outer iterations compile once).

  Args:
    optim: `name` ("adam", "adamw" or "sgd"), `learning_rate`, `weight_decay` (adamw; also used
      as L2 for the others when > 0), `clip_norm` (global-norm clipping, 0 = off), `momentum`
      (sgd).

  Returns:
    The optimizer.
  """
  return _make_optimizer(tuple(sorted(dict(optim).items())))


@functools.lru_cache(maxsize=16)
def _make_optimizer(items: tuple[tuple[str, Any], ...]) -> optax.GradientTransformation:
  optim = dict(items)
  name, lr = optim["name"], optim["learning_rate"]
  weight_decay = optim.get("weight_decay", 0.0)
  if name == "adam":
    opt = optax.adam(lr)
  elif name == "adamw":
    opt = optax.adamw(lr, weight_decay=weight_decay)
  elif name == "sgd":
    opt = optax.sgd(lr, momentum=optim.get("momentum", 0.0) or None)
  else:
    raise ValueError(f"Unknown optimizer {name!r}: use adam, adamw or sgd.")
  if name != "adamw" and weight_decay:
    opt = optax.chain(optax.add_decayed_weights(weight_decay), opt)
  if optim.get("clip_norm", 0.0):
    opt = optax.chain(optax.clip_by_global_norm(optim["clip_norm"]), opt)
  return opt


def steps_per_epoch(data: Sequence[Batch], batch_size: int) -> int:
  """Steps for the largest task to see each of its examples once (remainders dropped).

  Args:
    data: per-task dicts of arrays with a leading example axis.
    batch_size: per-task batch size.

  Returns:
    The number of steps in one epoch.
  """
  return max(_num_examples(d) // batch_size for d in data)


def sample_batches(
  key: jax.Array, step: jax.Array, data: Sequence[Batch], batch_size: int
) -> tuple[Batch, ...]:
  """Returns each task's batch for `step`, a pure function of (key, task, step). Jit-compatible.

  Each task runs through its own epochs (a fresh permutation each epoch, the remainder dropped),
  so tasks of different sizes are all used fully.

  Args:
    key: the data key (typed).
    step: int32 scalar, the step being taken (0-based).
    data: per-task dicts of arrays, leading axis = examples.
    batch_size: per-task batch size (static).

  Returns:
    One batch dict per task.
  """
  batches = []
  for task, task_data in enumerate(data):
    n = _num_examples(task_data)
    per_epoch = n // batch_size
    epoch, position = step // per_epoch, step % per_epoch
    perm = jax.random.permutation(jax.random.fold_in(jax.random.fold_in(key, task), epoch), n)
    idx = jax.lax.dynamic_slice(perm, (position * batch_size,), (batch_size,))
    batches.append(jax.tree.map(lambda a, idx=idx: jnp.take(a, idx, axis=0), task_data))
  return tuple(batches)


@functools.lru_cache(maxsize=8)
def make_train_step(
  apply_fn: ApplyFn,
  objective: objectives.Objective,
  blocks: coefficients_lib.Blocks,
  optimizer: optax.GradientTransformation,
  *,
  batch_size: int,
  clamp: Sequence[float] | None = None,
  use_mgda: bool = False,
) -> Callable[..., tuple[dict[str, Any], dict[str, jax.Array]]]:
  """Returns the jitted step `(train_state, base, basis, data) -> (train_state, metrics)`.

  θ0, the basis and the data are arguments, not closed-over constants: XLA then keeps one copy
  of each (the caller's) instead of baking them into the executable. θ(Λ) is built once per step
  and shared by every task's forward pass.

  Args:
    apply_fn: `logits = apply_fn(params, x, task_index)`, task_index a Python int.
    objective: the per-task loss.
    blocks: block assignment of Λ's columns.
    optimizer: optax optimizer over Λ.
    batch_size: per-task batch size.
    clamp: `(low, high)` to project Λ after each update (projected gradient), or empty.
    use_mgda: combine per-task gradients with MGDA instead of summing them.

  Returns:
    The jitted step; `train_state` (donated) is {"coeffs", "opt_state", "step", "rng"}. Cached
    on the (hashable) arguments, so repeated runs with the same pieces reuse the compilation.
  """

  def task_loss(t, params, batch):
    return objective.fn(apply_fn(params, batch["x"], t), batch)

  def losses_and_grads(coeffs, base, basis, batches):
    # Two-stage backprop: θ(Λ) is built once; each task's forward/backward gives the cotangent
    # of θ; one VJP of the merge maps the summed cotangent to Λ (per task for MGDA).
    params, merge_vjp = jax.vjp(
      lambda c: coefficients_lib.merge_with_coefficients(c, base, basis, blocks), coeffs
    )
    if _same_shapes(batches):
      # Tasks run one after another in a scan (lax.switch picks the head), so one task's
      # buffers and one running θ cotangent are alive at a time. Unrolled, XLA's CPU scheduler
      # keeps every task's weight gradients alive at once (~0.5 θ per extra task).
      branches = [functools.partial(task_loss, t) for t in range(len(batches))]

      def body(total, xs):
        t, batch = xs
        loss, task_vjp = jax.vjp(lambda p: jax.lax.switch(t, branches, p, batch), params)
        (cotangent,) = task_vjp(jnp.ones_like(loss))
        if use_mgda:
          return total, (loss, merge_vjp(cotangent)[0])
        return jax.tree.map(jnp.add, total, cotangent), (loss, None)

      stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
      zero = None if use_mgda else jax.tree.map(jnp.zeros_like, params)
      total, (losses, per_task) = jax.lax.scan(body, zero, (jnp.arange(len(batches)), stacked))
    else:  # Tasks with differently shaped inputs: an unrolled Python loop.
      losses, per_task, total = [], [], None
      for t, batch in enumerate(batches):
        loss, task_vjp = jax.vjp(functools.partial(task_loss, t, batch=batch), params)
        (cotangent,) = task_vjp(jnp.ones_like(loss))
        losses.append(loss)
        if use_mgda:
          per_task.append(merge_vjp(cotangent)[0])
        else:
          total = cotangent if total is None else jax.tree.map(jnp.add, total, cotangent)
      losses = jnp.stack(losses)
      per_task = jnp.stack(per_task) if use_mgda else None
    if use_mgda:
      grads, weights = mgda.min_norm_combination(per_task)
    else:
      (grads,) = merge_vjp(total)
      weights = jnp.ones_like(losses)
    return losses, grads, weights

  def train_step(state, base, basis, data):
    key = jax.random.wrap_key_data(state["rng"])
    batches = sample_batches(key, state["step"], data, batch_size)
    losses, grads, weights = losses_and_grads(state["coeffs"], base, basis, batches)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["coeffs"])
    coeffs = optax.apply_updates(state["coeffs"], updates)
    coeffs = coefficients_lib.clamp_coefficients(coeffs, clamp)
    new_state = dict(state, coeffs=coeffs, opt_state=opt_state, step=state["step"] + 1)
    return new_state, {"loss": jnp.sum(losses), "task_losses": losses, "task_weights": weights}

  return jax.jit(train_step, donate_argnums=0)


@functools.lru_cache(maxsize=8)
def make_params_evaluator(
  apply_fn: ApplyFn, *, eval_batch_size: int = 512
) -> Callable[[Params, Sequence[Batch]], list[dict[str, float]]]:
  """Returns `evaluate(params, data) -> [per-task metrics]`.

  Metrics per task: "entropy" always; "cross_entropy" and "accuracy" when the data has "y".

  Args:
    apply_fn: as for `make_train_step`.
    eval_batch_size: examples per forward pass.

  Returns:
    The evaluator (host-side loop over tasks and chunks; jitted forward).
  """

  @functools.partial(jax.jit, static_argnums=2)
  def chunk_sums(params, batch, task):
    logits = apply_fn(params, batch["x"], task)
    n = logits.shape[0]
    sums = {"entropy": objectives.entropy(logits) * n}
    if "y" in batch:
      sums["cross_entropy"] = objectives.cross_entropy(logits, batch) * n
      sums["accuracy"] = objectives.accuracy(logits, batch) * n
    return sums

  def evaluate(params, data):
    results = []
    for task, task_data in enumerate(data):
      n = _num_examples(task_data)
      totals = None
      for start in range(0, n, eval_batch_size):
        chunk = jax.tree.map(lambda a, s=start: a[s : s + eval_batch_size], task_data)
        sums = chunk_sums(params, chunk, task)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
      results.append({k: float(v) / n for k, v in jax.device_get(totals).items()})
    return results

  return evaluate


def make_evaluator(
  apply_fn: ApplyFn, blocks: coefficients_lib.Blocks, *, eval_batch_size: int = 512
) -> Callable[..., list[dict[str, float]]]:
  """Returns `evaluate(coeffs, base, basis, data) -> [per-task metrics]` (builds θ(Λ) once).

  Args:
    apply_fn: as for `make_train_step`.
    blocks: block assignment.
    eval_batch_size: examples per forward pass.

  Returns:
    The evaluator; metrics as in `make_params_evaluator`.
  """
  merge = _jitted_merge(blocks)
  evaluate_params = make_params_evaluator(apply_fn, eval_batch_size=eval_batch_size)

  def evaluate(coeffs, base, basis, data):
    return evaluate_params(merge(coeffs, base, basis), data)

  return evaluate


def selection_metric(
  task_metrics: Sequence[Mapping[str, float]],
  name: str,
  reference_accuracy: Sequence[float] | None = None,
) -> float:
  """Reduces per-task validation metrics to one number; higher is better.

  Args:
    task_metrics: output of the evaluator.
    name: "accuracy" (mean over tasks; normalized by `reference_accuracy` when given),
      "neg_entropy" or "neg_cross_entropy".
    reference_accuracy: per-task accuracy of the fine-tuned experts, for normalized accuracy.

  Returns:
    The metric.
  """
  if name == "accuracy":
    accs = [m["accuracy"] for m in task_metrics]
    if reference_accuracy is not None:
      accs = [a / r for a, r in zip(accs, reference_accuracy, strict=True)]
    return float(np.mean(accs))
  if name == "neg_entropy":
    return -float(np.mean([m["entropy"] for m in task_metrics]))
  if name == "neg_cross_entropy":
    return -float(np.mean([m["cross_entropy"] for m in task_metrics]))
  raise ValueError(f"Unknown selection metric {name!r}: use one of {SELECTION_METRICS}.")


def learn_coefficients(
  apply_fn: ApplyFn,
  base: Params,
  basis: Sequence[Params],
  adapt_data: Sequence[Batch],
  config: Any,
  *,
  val_data: Sequence[Batch] | None = None,
  reference_accuracy: Sequence[float] | None = None,
  workdir: str | pathlib.Path | None = None,
  on_step: Callable[[int], None] | None = None,
) -> LearnResult:
  """Learns Λ for θ(Λ) = θ0 + Σ_k Λ_k ⊙ v_k. See the module docstring for the phases.

  Args:
    apply_fn: `logits = apply_fn(params, x, task_index)`; `params` has θ0's structure.
    base: θ0 (for DV-BASI: the current iterate θ^(m−1)).
    basis: vectors v_k shaped like θ0.
    adapt_data: per-task dicts {"x": [n, ...], optionally "y": [n]}; the objective's data.
    config: ConfigDict/dict with `seed`, `adapt_split`, `coefficients`, `objective`, `optim`,
      `train`, `early_stopping`, `ckpt` (see configs/adamerging.py for every field).
    val_data: per-task validation dicts for early stopping/selection (never test data).
    reference_accuracy: per-task expert validation accuracies (normalized accuracy).
    workdir: directory for checkpoints; None disables checkpointing.
    on_step: called with the finished step number after each step, before its checkpoint is
      written (tests use it to simulate a kill).

  Returns:
    A `LearnResult`.
  """
  # 1. Set up.
  cc, oc, tc, ec = config.coefficients, config.objective, config.train, config.early_stopping
  blocks = coefficients_lib.make_blocks(
    base, granularity=cc.granularity, patterns=tuple(cc.patterns)
  )
  objective_kwargs = {"threshold": oc.threshold} if oc.name == "pseudo_label" else {}
  objective = objectives.get_objective(oc.name, **objective_kwargs)
  adapt_data = _check_data(adapt_data, tc.batch_size, objective.needs_labels, "adapt_data")
  optimizer = make_optimizer(config.optim)
  train_step = make_train_step(
    apply_fn,
    objective,
    blocks,
    optimizer,
    batch_size=tc.batch_size,
    clamp=tuple(cc.clamp),
    use_mgda=bool(oc.mgda),
  )
  per_epoch = steps_per_epoch(adapt_data, tc.batch_size)
  total_steps = tc.epochs * per_epoch if tc.epochs > 0 else tc.steps
  eval_every = per_epoch if tc.eval_every == 0 else tc.eval_every
  evaluating = val_data is not None and tc.eval_every >= 0
  if evaluating:
    needs_labels = ec.metric in ("accuracy", "neg_cross_entropy")
    # Validation labels, when present, are kept for reporting even if selection ignores them.
    val_data = _check_data(val_data, 1, needs_labels, "val_data", keep_labels=True)
    evaluate = make_evaluator(apply_fn, blocks, eval_batch_size=tc.eval_batch_size)

  coeffs = coefficients_lib.init_coefficients(blocks, len(basis), cc.init)
  coeffs = coefficients_lib.clamp_coefficients(coeffs, tuple(cc.clamp))
  state = {
    "train": {
      "coeffs": coeffs,
      "opt_state": optimizer.init(coeffs),
      "step": jnp.zeros([], jnp.int32),
      # Raw key data: a checkpoint holds plain uint32, independent of the key implementation.
      "rng": jax.random.key_data(jax.random.key(config.seed)),
    },
    "best": {
      "coeffs": jnp.array(coeffs, copy=True),
      "metric": jnp.full([], -jnp.inf, jnp.float32),
      "step": jnp.zeros([], jnp.int32),
      "bad_evals": jnp.zeros([], jnp.int32),
      "stopped": jnp.zeros([], jnp.int32),
    },
  }
  history = {"loss": [], "eval": []}

  # 2. Resume.
  manager = checkpoint.training_manager(workdir, **config.ckpt) if workdir is not None else None
  if manager is not None and manager.latest_step() is not None:
    state, history = checkpoint.restore_training_state(manager, state)
    logging.info("Resumed from step %d in %s.", manager.latest_step(), workdir)
  step = int(state["train"]["step"])
  stopped = bool(state["best"]["stopped"])

  try:
    while step < total_steps and not stopped:
      # 3. Train.
      state["train"], metrics = train_step(state["train"], base, basis, adapt_data)
      step += 1
      if step % tc.log_every == 0 or step == total_steps:
        history["loss"].append([step, float(metrics["loss"])])

      # 4. Evaluate and stop early.
      if evaluating and (step % eval_every == 0 or step == total_steps):
        task_metrics = evaluate(state["train"]["coeffs"], base, basis, val_data)
        metric = selection_metric(task_metrics, ec.metric, reference_accuracy)
        history["eval"].append([step, metric, task_metrics])
        best = state["best"]
        if metric > float(best["metric"]):
          state["best"] = dict(
            best,
            coeffs=jnp.array(state["train"]["coeffs"], copy=True),
            metric=jnp.asarray(metric, jnp.float32),
            step=jnp.asarray(step, jnp.int32),
            bad_evals=jnp.zeros([], jnp.int32),
          )
        else:
          bad = int(best["bad_evals"]) + 1
          stopped = 0 < ec.patience <= bad
          state["best"] = dict(
            best,
            bad_evals=jnp.asarray(bad, jnp.int32),
            stopped=jnp.asarray(stopped, jnp.int32),
          )
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

  final_coeffs = state["train"]["coeffs"]
  if evaluating and history["eval"]:
    chosen, best_step = state["best"]["coeffs"], int(state["best"]["step"])
    best_metric = float(state["best"]["metric"])
  else:
    chosen, best_step, best_metric = final_coeffs, step, math.nan
  params = jax.jit(functools.partial(coefficients_lib.merge_with_coefficients, blocks=blocks))(
    chosen, base, basis
  )
  return LearnResult(
    params=params,
    coeffs=chosen,
    final_coeffs=final_coeffs,
    blocks=blocks,
    history=history,
    best_step=best_step,
    best_metric=best_metric,
    transductive=config.adapt_split == "test",
  )


def _same_shapes(batches: Sequence[Batch]) -> bool:
  shapes = {tuple((k, v.shape, v.dtype) for k, v in sorted(batch.items())) for batch in batches}
  return len(shapes) == 1


@functools.lru_cache(maxsize=8)
def _jitted_merge(blocks: coefficients_lib.Blocks) -> Callable[..., Params]:
  return jax.jit(functools.partial(coefficients_lib.merge_with_coefficients, blocks=blocks))


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
