"""Pre-training and fine-tuning of the benchmark's models with optax.

Four fine-tuning modes, all with the classification head frozen (only the backbone moves):

  standard    AdamW with a warm-up + cosine learning-rate schedule (the task_vectors recipe).
  sam         sharpness-aware minimization (Foret 2021) via `optax.contrib.sam`: one ascent step
              of length rho along the normalized gradient, then the AdamW step with the gradient
              taken there.
  asam        adaptive SAM (Kwon 2021): the ascent step is rho * T^2 g / ||T g|| with
              T = |w| + eta, so it is invariant to per-weight rescaling (SAFT uses rho = 0.5).
  linearized  fine-tunes the first-order Taylor model around the pre-trained backbone theta0,
              f(x; theta0) + J(theta0) (theta - theta0), computed with `jax.jvp` (Ortiz-Jimenez
              2023). Evaluate such experts, and merges of them, with the same linearized forward.

Pre-training trains backbone and head together on a task mixture; the head is then frozen and
shared by every expert, like CLIP's zero-shot text head.

The base optimizer is AdamW (`optimizer="adamw"`) or SGD with momentum (`optimizer="sgd"`, the
classic fine-tuning recipe of ViT and BiT). They give task vectors of different shape: Adam
normalizes every coordinate's step by its own gradient scale, so each consistently pushed weight
moves by about the learning rate per step and the task vector's magnitudes are flat; SGD's steps
are proportional to the gradients, whose magnitudes are heavy-tailed, and so are its task
vectors (which is what magnitude trimming, e.g. TIES's, relies on).

Weight decay is decoupled (AdamW, and SGDW for SGD: added after the momentum), towards 0 by
default. With `decay_to_init` it pulls towards the weights the run
started from instead (L2-SP, Li et al. 2018): decay towards 0 adds the same -c·θ0 component to
every expert's task vector, decay towards θ0 adds none.
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from mergejax import layer_decay, losses
from mergejax.tree import Params

MODES = ("standard", "sam", "asam", "linearized")


class TrainConfig(NamedTuple):
  """Optimization settings of one training run.

  Attributes:
    steps: optimizer steps.
    batch_size: examples per step.
    learning_rate: peak learning rate of the warm-up + cosine schedule.
    warmup_steps: linear warm-up steps.
    weight_decay: AdamW's decoupled weight decay.
    rho: SAM / ASAM neighbourhood radius (METHODS.md: SAM 0.05, ASAM 0.5).
    asam_eta: ASAM's offset in T = |w| + eta.
    chunk: steps fused into one jitted `lax.scan` call (one progress-bar tick).
    decay_to_init: decay towards the initial weights (θ0 when fine-tuning) rather than 0.
    optimizer: "adamw" or "sgd" (with momentum).
    momentum: SGD's momentum (heavy ball); unused by AdamW.
    layer_decay: layer-wise learning-rate decay (BEiT, ELECTRA): a leaf of layer l of a model
      with L blocks learns at `learning_rate * layer_decay ** (L + 1 - l)`, see
      `mergejax.layer_decay`
      (1.0: the same rate everywhere). Its weight decay scales with it.
  """

  steps: int = 500
  batch_size: int = 128
  learning_rate: float = 1e-3
  warmup_steps: int = 50
  weight_decay: float = 0.1
  rho: float = 0.05
  asam_eta: float = 0.01
  chunk: int = 50
  decay_to_init: bool = False
  optimizer: str = "adamw"
  momentum: float = 0.9
  layer_decay: float = 1.0


def make_apply(
  model: nn.Module, *, mode: str = "standard", base_backbone: Params | None = None
) -> Callable[[Params, Params, jax.Array], jax.Array]:
  """Returns `apply(backbone, head, x) -> logits`, linearized around `base_backbone` if asked.

  Args:
    model: flax module with params {"backbone", "head"}.
    mode: one of MODES; only "linearized" changes the forward pass.
    base_backbone: the expansion point theta0; required for mode "linearized".

  Returns:
    A pure function of (backbone, head, x).
  """
  if mode not in MODES:
    raise ValueError(f"Unknown mode {mode!r}; known: {MODES}.")
  if mode != "linearized":
    return functools.partial(_apply, model)
  if base_backbone is None:
    raise ValueError("mode='linearized' needs base_backbone (the expansion point).")
  return lambda backbone, head, x: _apply_linearized(model, backbone, head, x, base_backbone)


def _apply(model, backbone, head, x):
  return model.apply({"params": {"backbone": backbone, "head": head}}, x)


def _apply_linearized(model, backbone, head, x, base_backbone):
  # f(theta0) + J(theta0) (theta - theta0): one forward-mode product, no Jacobian materialized.
  delta = jax.tree.map(jnp.subtract, backbone, base_backbone)
  out, tangent = jax.jvp(lambda b: _apply(model, b, head, x), (base_backbone,), (delta,))
  return out + tangent


def scale_by_adaptive_sharpness(eta: float = 0.01) -> optax.GradientTransformation:
  """ASAM's ascent direction: T^2 g / ||T g|| with T = |w| + eta (global norm over the tree).

  Chain it with `optax.sgd(rho)` and pass it as `adv_optimizer` to `optax.contrib.sam`.

  Args:
    eta: offset that keeps the step non-zero for zero weights.

  Returns:
    A stateless optax transformation that needs `params` in `update`.
  """

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("scale_by_adaptive_sharpness needs params.")
    t = jax.tree.map(lambda w: jnp.abs(w) + eta, params)
    tg = jax.tree.map(jnp.multiply, t, updates)
    norm = optax.tree.norm(tg) + 1e-12
    return jax.tree.map(lambda ti, tgi: ti * tgi / norm, t, tg), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


class DecayTowardsInitState(NamedTuple):
  """The weights at `init`: what `add_decayed_weights_towards_init` decays towards."""

  anchor: Params


def add_decayed_weights_towards_init(weight_decay: float) -> optax.GradientTransformation:
  """Adds `weight_decay * (params - params_at_init)` to the updates (decoupled L2-SP).

  In place of `optax.add_decayed_weights` inside AdamW's chain, it pulls the weights towards the
  point the run started from rather than towards 0; with initial weights 0 the two agree.

  Args:
    weight_decay: the decay rate (multiplied by the learning rate downstream, as in AdamW).

  Returns:
    An optax transformation that needs `params` in `update`; its state holds a copy of the
    initial params.
  """

  def init_fn(params):
    return DecayTowardsInitState(anchor=jax.tree.map(jnp.array, params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("add_decayed_weights_towards_init needs params.")
    updates = jax.tree.map(
      lambda g, p, a: g + weight_decay * (p - a), updates, params, state.anchor
    )
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


OPTIMIZERS = ("adamw", "sgd")


def make_optimizer(cfg: TrainConfig, *, mode: str = "standard") -> optax.GradientTransformation:
  """AdamW or SGD with warm-up + cosine decay (and layer-wise decay), in SAM / ASAM for those modes.

  Args:
    cfg: optimization settings.
    mode: one of MODES.

  Returns:
    The optax transformation; for "sam" / "asam" its `update` needs `grad_fn=`.
  """
  schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=cfg.learning_rate,
    warmup_steps=cfg.warmup_steps,
    decay_steps=max(cfg.steps, cfg.warmup_steps + 1),
  )
  if cfg.optimizer not in OPTIMIZERS:
    raise ValueError(f"Unknown optimizer {cfg.optimizer!r}; known: {OPTIMIZERS}.")
  decay = (
    add_decayed_weights_towards_init(cfg.weight_decay)
    if cfg.decay_to_init
    else optax.add_decayed_weights(cfg.weight_decay)
  )
  if cfg.optimizer == "sgd":
    # SGDW (Loshchilov & Hutter 2019): heavy-ball momentum on the gradient, then the decoupled
    # decay, as AdamW does; inside the momentum the decay would weigh 1 / (1 - momentum) more.
    opt = optax.chain(
      optax.trace(decay=cfg.momentum), decay, optax.scale_by_learning_rate(schedule)
    )
  elif cfg.decay_to_init:
    # optax.adamw's chain with the decay term replaced.
    opt = optax.chain(optax.scale_by_adam(), decay, optax.scale_by_learning_rate(schedule))
  else:
    opt = optax.adamw(schedule, weight_decay=cfg.weight_decay)
  if cfg.layer_decay != 1.0:
    opt = optax.chain(opt, layer_decay.scale_by_layer_decay(cfg.layer_decay))
  if mode == "sam":
    adv = optax.chain(optax.contrib.normalize(), optax.sgd(cfg.rho))
  elif mode == "asam":
    adv = optax.chain(scale_by_adaptive_sharpness(cfg.asam_eta), optax.sgd(cfg.rho))
  else:
    return opt
  # Opaque mode: each `update` runs the ascent step and the outer step, so every call is one
  # real optimizer step and the schedule counts outer steps only.
  return optax.contrib.sam(opt, adv, sync_period=2, opaque_mode=True)


def make_train_step(
  model: nn.Module,
  opt: optax.GradientTransformation,
  *,
  train_head: bool,
  mode: str = "standard",
) -> Callable[..., tuple[Params, Any, jax.Array]]:
  """Returns `step(trainable, opt_state, frozen, x, y) -> (trainable, opt_state, loss)`.

  Args:
    model: flax module with params {"backbone", "head"}.
    opt: optimizer from `make_optimizer`.
    train_head: if True, `trainable` is {"backbone", "head"}; otherwise it is the backbone.
    mode: one of MODES; "sam" / "asam" pass `grad_fn` to the optimizer; "linearized" trains the
      Taylor model around `frozen["base"]`.

  Returns:
    The (un-jitted) step function; `frozen` is {"head": head, "base": theta0 backbone or None}.
  """

  def loss_fn(trainable, frozen, x, y):
    if train_head:
      logits = _apply(model, trainable["backbone"], trainable["head"], x)
    elif mode == "linearized":
      logits = _apply_linearized(model, trainable, frozen["head"], x, frozen["base"])
    else:
      logits = _apply(model, trainable, frozen["head"], x)
    return losses.cross_entropy(logits, y)

  def step(trainable, opt_state, frozen, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, x, y)
    if mode in ("sam", "asam"):
      grad_fn = lambda p, _: jax.grad(loss_fn)(p, frozen, x, y)
      updates, opt_state = opt.update(grads, opt_state, trainable, grad_fn=grad_fn)
    else:
      updates, opt_state = opt.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  return step


@functools.lru_cache(maxsize=32)
def _jitted_chunk(
  model: nn.Module, cfg: TrainConfig, mode: str, train_head: bool
) -> Callable[..., Any]:
  # Cached on everything the program depends on, so the experts of one mode share one compile
  # (data, head and expansion point are arguments, not constants).
  opt = make_optimizer(cfg, mode=mode)
  step = make_train_step(model, opt, train_head=train_head, mode=mode)

  def run(trainable, opt_state, frozen, xs, ys):
    def body(carry, batch):
      trainable, opt_state = carry
      trainable, opt_state, loss = step(trainable, opt_state, frozen, *batch)
      return (trainable, opt_state), loss

    (trainable, opt_state), losses = jax.lax.scan(body, (trainable, opt_state), (xs, ys))
    return trainable, opt_state, losses

  return opt, jax.jit(run, donate_argnums=(0, 1))


def train(
  model: nn.Module,
  params: Params,
  data: Any,
  cfg: TrainConfig,
  *,
  mode: str = "standard",
  train_head: bool = False,
  base_backbone: Params | None = None,
  seed: int = 0,
  desc: str | None = None,
) -> tuple[Params, np.ndarray]:
  """Trains `params` on `data`; the head stays frozen unless `train_head`.

  Batches are drawn with replacement from a seeded NumPy generator, so a run is deterministic
  given (params, data, cfg, mode, seed) on one machine.

  Args:
    model: flax module with params {"backbone", "head"}.
    params: initial {"backbone", "head"}.
    data: training examples (one task or a mixture): arrays `.x` [n, ...] and `.y` [n], e.g. a
      `mergejax.benchmarks.common.data.Split`.
    cfg: optimization settings.
    mode: one of MODES.
    train_head: train the head too (pre-training); fine-tuning keeps it frozen.
    base_backbone: linearization point for mode "linearized" (default: `params["backbone"]`).
    seed: seed of the batch sampler.
    desc: progress-bar label; None hides the bar.

  Returns:
    (trained params {"backbone", "head"}, losses [steps]).
  """
  if mode == "linearized" and train_head:
    raise ValueError("Linearized training keeps the head frozen.")
  if mode == "linearized" and base_backbone is None:
    base_backbone = params["backbone"]
  opt, run_chunk = _jitted_chunk(model, cfg, mode, train_head)

  # Copy: the jitted chunk donates its inputs, and the caller keeps `params`.
  trainable = jax.tree.map(jnp.array, params if train_head else params["backbone"])
  frozen = {"head": params["head"], "base": base_backbone}
  opt_state = opt.init(trainable)
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, len(data), size=(cfg.steps, cfg.batch_size))
  losses = []
  with tqdm.tqdm(total=cfg.steps, desc=desc, disable=desc is None, leave=False) as bar:
    for start in range(0, cfg.steps, cfg.chunk):
      chunk_idx = idx[start : start + cfg.chunk]
      trainable, opt_state, loss = run_chunk(
        trainable, opt_state, frozen, data.x[chunk_idx], data.y[chunk_idx]
      )
      losses.append(loss)
      bar.update(len(chunk_idx))
  losses = np.concatenate([np.asarray(x) for x in losses])
  if train_head:
    return trainable, losses
  return {"backbone": trainable, "head": params["head"]}, losses
