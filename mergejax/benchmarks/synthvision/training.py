"""Training loops of the synthvision zoo that `mergejax.finetune.train` does not cover: broad
multi-attribute pre-training (one linear head per attribute, label smoothing; the heads are then
discarded) and the multi-task reference (one backbone, each task read out by its own frozen head).

Both run `fit`: the optimizer of `finetune.make_optimizer` (AdamW, warm-up + cosine), batches drawn
on the host from a seeded NumPy generator, and `chunk` steps fused in one jitted `lax.scan`.
"""

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from mergejax import finetune, losses
from mergejax.benchmarks.common.data import Split
from mergejax.tree import Params


def fit(
  loss_fn: Callable[[Params, Any, Any], jax.Array],
  params: Params,
  frozen: Any,
  draw: Callable[[np.random.Generator, int], Any],
  cfg: finetune.TrainConfig,
  *,
  seed: int = 0,
  desc: str | None = None,
) -> tuple[Params, np.ndarray]:
  """Minimizes `loss_fn(params, frozen, batch)` with `cfg`'s optimizer.

  Args:
    loss_fn: scalar loss of one batch.
    params: initial trainable parameters (copied; the caller's stay intact).
    frozen: arrays the loss reads but does not train (heads, anchors).
    draw: `draw(rng, k)` returns a pytree of host arrays holding `k` batches (leading axis k).
    cfg: optimization settings (`mode` is always "standard" here).
    seed: seed of the batch generator.
    desc: progress-bar label; None hides the bar.

  Returns:
    (trained params, losses [steps]).
  """
  opt = finetune.make_optimizer(cfg)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def run(params, opt_state, frozen, batches):
    def body(carry, batch):
      params, opt_state = carry
      loss, grads = jax.value_and_grad(loss_fn)(params, frozen, batch)
      updates, opt_state = opt.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), batches)
    return params, opt_state, losses

  params = jax.tree.map(jnp.array, params)
  opt_state = opt.init(params)
  rng = np.random.default_rng(seed)
  losses = []
  with tqdm.tqdm(total=cfg.steps, desc=desc, disable=desc is None, leave=False) as bar:
    for start in range(0, cfg.steps, cfg.chunk):
      k = min(cfg.chunk, cfg.steps - start)
      params, opt_state, loss = run(params, opt_state, frozen, draw(rng, k))
      losses.append(np.asarray(loss))
      bar.update(k)
  return params, np.concatenate(losses)


def pixels(x: jax.Array) -> jax.Array:
  """Model inputs from uint8 images (or floats already converted): float32 in [-0.5, 0.5]."""
  if x.dtype == jnp.uint8:
    return x.astype(jnp.float32) / 255.0 - 0.5
  return x.astype(jnp.float32)


def pretrain(
  backbone: nn.Module,
  images: np.ndarray,
  labels: Mapping[str, np.ndarray],
  num_classes: Mapping[str, int],
  cfg: finetune.TrainConfig,
  *,
  label_smoothing: float = 0.1,
  seed: int = 0,
  desc: str | None = None,
) -> tuple[Params, Params, np.ndarray]:
  """Supervised multi-attribute pre-training: one linear head per attribute on shared features.

  The loss is the mean over attributes of the label-smoothed cross-entropy, so no attribute's
  head is pushed to certainty (the features stay calibrated for the prototype heads built later).
  A label of -1 marks an attribute the example does not define; it is left out of that mean.

  Args:
    backbone: the image encoder module.
    images: uint8 [n, H, W, 3].
    labels: {attribute: int [n]}, -1 where undefined.
    num_classes: {attribute: classes}.
    cfg: optimization settings.
    label_smoothing: mass spread uniformly over the classes.
    seed: seed of the initialization and the batches.
    desc: progress-bar label.

  Returns:
    (backbone params, attribute heads {attr: {"kernel", "bias"}}, losses [steps]).
  """
  names = tuple(labels)
  key_init, key_heads = jax.random.split(jax.random.key(seed))
  init = backbone.init(key_init, pixels(jnp.asarray(images[:1])))["params"]
  width = backbone.apply({"params": init}, pixels(jnp.asarray(images[:1]))).shape[-1]
  heads = {
    name: nn.Dense(num_classes[name]).init(k, jnp.zeros((1, width)))["params"]
    for name, k in zip(names, jax.random.split(key_heads, len(names)), strict=True)
  }

  def loss_fn(params, frozen, batch):
    del frozen
    x, ys = batch
    feats = backbone.apply({"params": params["backbone"]}, pixels(x))
    total = 0.0
    for name in names:
      logits = feats @ params["heads"][name]["kernel"] + params["heads"][name]["bias"]
      k, y = num_classes[name], ys[name]
      target = optax.smooth_labels(jax.nn.one_hot(jnp.maximum(y, 0), k), label_smoothing)
      defined = (y >= 0).astype(jnp.float32)
      ce = optax.softmax_cross_entropy(logits, target)
      total = total + jnp.sum(ce * defined) / jnp.maximum(jnp.sum(defined), 1.0)
    return total / len(names)

  def draw(rng, k):
    idx = rng.integers(0, len(images), size=(k, cfg.batch_size))
    return images[idx], {name: labels[name][idx] for name in names}

  params, losses = fit(
    loss_fn, {"backbone": init, "heads": heads}, None, draw, cfg, seed=seed, desc=desc
  )
  return params["backbone"], params["heads"], losses


def multitask(
  model: nn.Module,
  backbone: Params,
  heads: Sequence[Params],
  splits: Sequence[Split],
  cfg: finetune.TrainConfig,
  *,
  seed: int = 0,
  desc: str | None = None,
) -> tuple[Params, np.ndarray]:
  """Trains one backbone on all tasks at once, each read out by its own frozen head.

  Every step draws `cfg.batch_size` examples of each task; the loss is the mean over tasks of
  their cross-entropies.

  Args:
    model: flax module with params {"backbone", "head"} (heads of one shape, e.g. padded).
    backbone: the starting backbone (the pre-trained one).
    heads: one frozen head per task.
    splits: one training split per task.
    cfg: optimization settings.
    seed: seed of the batches.
    desc: progress-bar label.

  Returns:
    (trained backbone, losses [steps]).
  """
  stacked_heads = jax.tree.map(lambda *h: jnp.stack(h), *heads)

  def loss_fn(params, frozen, batch):
    xs, ys = batch  # [T, b, ...], [T, b]

    def task_loss(head, x, y):
      logits = model.apply({"params": {"backbone": params, "head": head}}, pixels(x))
      return losses.cross_entropy(logits, y)

    return jax.vmap(task_loss)(frozen, xs, ys).mean()

  def draw(rng, k):
    xs, ys = [], []
    for s in splits:
      idx = rng.integers(0, len(s), size=(k, cfg.batch_size))
      xs.append(s.x[idx])
      ys.append(s.y[idx])
    return np.stack(xs, axis=1), np.stack(ys, axis=1)

  return fit(loss_fn, backbone, stacked_heads, draw, cfg, seed=seed, desc=desc)
