"""The jitted training step of learned merging, and what it is built from.

`make_train_step` returns one jitted call per step that samples every task's batch from the
device-resident data (`sample_batches`, a pure function of (key, task, step)), builds θ(coeffs)
once, runs forward and backward on every task (a `lax.scan` over tasks when their batches share
shapes, so memory does not grow with the number of tasks), maps θ's cotangent to the
coefficients, sums the per-task gradients (or combines them with MGDA), and applies the optax
update and the parametrization's projection. `make_compiled` bundles it with the jitted merge and
evaluator of one run; `loop.train` drives it.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mergejax.learned import evaluation, mgda, objectives
from mergejax.learned.parametrizations import Parametrization
from mergejax.learned.problem import Augment, traced_task
from mergejax.learned.sharding import Placement
from mergejax.tree import Params

Coeffs = Any
Batch = dict[str, jax.Array]
ApplyFn = Callable[[Params, jax.Array, int], jax.Array]

EPOCH_LENGTHS = ("smallest", "largest")
AUGMENT_STREAM = 0x7FFFFFFF  # fold_in constant of the augmentation keys; no task index reaches it.


class TrainState(NamedTuple):
  """What the jitted step reads and replaces (donated)."""

  coeffs: Coeffs
  opt_state: optax.OptState
  step: jax.Array  # int32 scalar: steps taken.
  rng: jax.Array  # Raw uint32 key data: a checkpoint holds no key-implementation detail.


class Compiled(NamedTuple):
  """The jitted pieces of one run (share them between runs through a `problem.CompileCache`)."""

  train_step: Callable[..., tuple[TrainState, dict[str, jax.Array]]]
  merge: Callable[[Coeffs, Params, Sequence[Params]], Params]
  evaluator: evaluation.Evaluator


def make_optimizer(optim: Any) -> optax.GradientTransformation:
  """Builds the optax optimizer a config names.

  Args:
    optim: `name` ("adam", "adamw" or "sgd"), `learning_rate`, `weight_decay` (adamw; also used
      as L2 for the others when > 0), `clip_norm` (global-norm clipping, 0 = off), `momentum`
      (sgd).

  Returns:
    The optimizer.
  """
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


def steps_per_epoch(data: Sequence[Batch], batch_size: int, epoch_length: str = "largest") -> int:
  """Steps in one epoch (remainders dropped).

  Args:
    data: per-task dicts of arrays with a leading example axis.
    batch_size: examples per task and step.
    epoch_length: "smallest": the tasks run in lockstep and an epoch ends when the smallest task
      has been seen once (aTLAS's reference); "largest": when the largest task has (each task
      cycles through its own epochs meanwhile).

  Returns:
    The number of steps in one epoch.
  """
  if epoch_length not in EPOCH_LENGTHS:
    raise ValueError(f"epoch_length must be one of {EPOCH_LENGTHS}, got {epoch_length!r}.")
  counts = [_num_examples(d) // batch_size for d in data]
  return min(counts) if epoch_length == "smallest" else max(counts)


def sample_batches(
  key: jax.Array,
  step: jax.Array,
  data: Sequence[Batch],
  batch_size: int,
  *,
  epoch_length: str = "largest",
) -> tuple[Batch, ...]:
  """Returns each task's batch for `step`, a pure function of (key, task, step). Jit-compatible.

  Each task draws a fresh permutation per epoch (remainder dropped). With "largest" every task
  has its own epochs (tasks of different sizes are all used fully); with "smallest" all tasks
  share the smallest task's epoch, and larger tasks use a new random subset each epoch.

  Args:
    key: the data key (typed).
    step: int32 scalar, the step being taken (0-based).
    data: per-task dicts of arrays, leading axis = examples.
    batch_size: examples per task (static).
    epoch_length: see `steps_per_epoch`.

  Returns:
    One batch dict per task.
  """
  shared = steps_per_epoch(data, batch_size, epoch_length)
  batches = []
  for task, task_data in enumerate(data):
    n = _num_examples(task_data)
    per_epoch = n // batch_size if epoch_length == "largest" else shared
    epoch, position = step // per_epoch, step % per_epoch
    perm = jax.random.permutation(jax.random.fold_in(jax.random.fold_in(key, task), epoch), n)
    idx = jax.lax.dynamic_slice(perm, (position * batch_size,), (batch_size,))
    batches.append(jax.tree.map(lambda a, idx=idx: jnp.take(a, idx, axis=0), task_data))
  return tuple(batches)


def make_train_step(
  apply_fn: ApplyFn,
  parametrization: Parametrization,
  objective: objectives.Objective,
  optimizer: optax.GradientTransformation,
  *,
  batch_size: int,
  batches_per_step: int = 1,
  epoch_length: str = "largest",
  use_mgda: bool = False,
  augment: Augment | None = None,
  placement: Placement | None = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """Returns the jitted step `(state, base, basis, data) -> (state, metrics)`; `state` is donated.

  θ0, the basis and the data are arguments, not closed-over constants: XLA then keeps one copy
  of each (the caller's) instead of baking them into the executable. θ(coeffs) is built once per
  step and shared by every task's forward pass.

  Args:
    apply_fn: `logits = apply_fn(params, x, task_index)`, task_index a Python int.
    parametrization: how coefficients make θ.
    objective: the per-task loss.
    optimizer: optax optimizer over the coefficients.
    batch_size: examples per task and batch.
    batches_per_step: batches per task and step; the loss sums the per-batch means (AdaMerging's
      reference code takes two).
    epoch_length: see `steps_per_epoch`.
    use_mgda: combine per-task gradients with MGDA instead of summing them.
    augment: the problem's `augment`, for objectives that need views.
    placement: on a mesh (`sharding.Placement`): θ(Λ) is split like θ0 over "model" and each
      batch over "data"; None for one device.

  Returns:
    The jitted step.
  """
  if objective.needs_augment and augment is None:
    raise ValueError("This objective needs weak/strong views: the problem must supply augment.")

  def task_loss(t, params, batch, key):
    def batch_loss(sub, sub_key):
      if placement is not None:
        sub = placement.constrain_batch(sub)

      def forward(view=None):
        x = sub["x"]
        if view is not None:
          x = augment(jax.random.fold_in(sub_key, objectives.VIEWS.index(view)), x, view)
        return apply_fn(params, x, t)

      return objective.loss(forward, sub)

    if batches_per_step == 1:
      return batch_loss(batch, key)
    total = 0.0
    for j in range(batches_per_step):
      sub = jax.tree.map(lambda a, j=j: a[j * batch_size : (j + 1) * batch_size], batch)
      total = total + batch_loss(sub, None if key is None else jax.random.fold_in(key, j))
    return total

  def losses_and_grads(coeffs, base, basis, batches, aug_key):
    # Two-stage backprop: θ is built once; each task's forward/backward gives the cotangent of θ;
    # one VJP of the merge maps the summed cotangent to the coefficients (per task for MGDA).
    def merge(c):
      params = parametrization.merge(c, base, basis)
      return params if placement is None else placement.constrain_model(params)

    params, merge_vjp = jax.vjp(merge, coeffs)

    def task_key(t):
      return None if aug_key is None else jax.random.fold_in(aug_key, t)

    if _same_shapes(batches):
      # Tasks run one after another in a scan (lax.switch picks the head, unless apply_fn takes
      # the traced index itself), so one task's buffers and one running θ cotangent are alive at
      # a time. Unrolled, XLA's CPU scheduler keeps every task's weight gradients alive at once
      # (~0.5 θ per extra task).
      branches = [functools.partial(task_loss, t) for t in range(len(batches))]

      def one_task(t, p, batch, key):
        if traced_task(apply_fn):
          return task_loss(t, p, batch, key)
        return jax.lax.switch(t, branches, p, batch, key)

      def body(total, xs):
        t, batch = xs
        loss, task_vjp = jax.vjp(lambda p: one_task(t, p, batch, task_key(t)), params)
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
        loss, task_vjp = jax.vjp(lambda p, t=t, b=batch: task_loss(t, p, b, task_key(t)), params)
        (cotangent,) = task_vjp(jnp.ones_like(loss))
        losses.append(loss)
        if use_mgda:
          per_task.append(merge_vjp(cotangent)[0])
        else:
          total = cotangent if total is None else jax.tree.map(jnp.add, total, cotangent)
      losses = jnp.stack(losses)
      per_task = jax.tree.map(lambda *g: jnp.stack(g), *per_task) if use_mgda else None
    if use_mgda:
      grads, weights = mgda.min_norm_combination_tree(per_task)
    else:
      (grads,) = merge_vjp(total)
      weights = jnp.ones_like(losses)
    return losses, grads, weights

  def train_step(state, base, basis, data):
    key = jax.random.wrap_key_data(state.rng)
    rows = batch_size * batches_per_step
    batches = sample_batches(key, state.step, data, rows, epoch_length=epoch_length)
    aug_key = None
    if objective.needs_augment:
      aug_key = jax.random.fold_in(jax.random.fold_in(key, AUGMENT_STREAM), state.step)
    losses, grads, weights = losses_and_grads(state.coeffs, base, basis, batches, aug_key)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.coeffs)
    coeffs = parametrization.project(optax.apply_updates(state.coeffs, updates))
    new_state = state._replace(coeffs=coeffs, opt_state=opt_state, step=state.step + 1)
    return new_state, {"loss": jnp.sum(losses), "task_losses": losses, "task_weights": weights}

  return jax.jit(train_step, donate_argnums=0)


def make_compiled(
  apply_fn: ApplyFn,
  parametrization: Parametrization,
  objective: objectives.Objective,
  optimizer: optax.GradientTransformation,
  train_config: Any,
  *,
  augment: Augment | None = None,
  placement: Placement | None = None,
) -> Compiled:
  """Builds the jitted step, merge and evaluator of one run.

  Args:
    apply_fn: `logits = apply_fn(params, x, task_index)`.
    parametrization: how coefficients make θ.
    objective: the per-task loss.
    optimizer: optax optimizer over the coefficients.
    train_config: `config.train` (batch_size, batches_per_step, epoch_length, mgda,
      eval_batch_size).
    augment: the problem's augmentation, if the objective needs views.
    placement: the mesh placement (`sharding.Placement`), or None for one device.

  Returns:
    The `Compiled` pieces (jit compiles them on first use).
  """
  tc = train_config
  step = make_train_step(
    apply_fn,
    parametrization,
    objective,
    optimizer,
    batch_size=tc.batch_size,
    batches_per_step=tc.batches_per_step,
    epoch_length=tc.epoch_length,
    use_mgda=bool(tc.mgda),
    augment=augment,
    placement=placement,
  )
  evaluator = evaluation.make_evaluator(apply_fn, eval_batch_size=tc.eval_batch_size)
  return Compiled(train_step=step, merge=jax.jit(parametrization.merge), evaluator=evaluator)


def _same_shapes(batches: Sequence[Batch]) -> bool:
  shapes = {tuple((k, v.shape, v.dtype) for k, v in sorted(batch.items())) for batch in batches}
  return len(shapes) == 1


def _num_examples(task_data: Batch) -> int:
  return int(jax.tree.leaves(task_data)[0].shape[0])
