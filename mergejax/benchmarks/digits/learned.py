"""Learned merging in the digits benchmark: the digits' `LearnProblem` (frozen shared head, the
experts' validation accuracies as the normalized-accuracy reference, the digits' views for aTLAS's
UFM); the rows come from `mergejax.benchmarks.common.learned_table`.
"""

import jax
import jax.numpy as jnp

from mergejax import finetune, learned
from mergejax.benchmarks.common import learned_table
from mergejax.benchmarks.common.data import stack_splits

# The strong view (aTLAS's UFM): pixel noise and erased pixels. Flips, rotations and crops would
# not do: they *are* the tasks here (and mean nothing after a pixel permutation), while noise and
# erasure commute with every task's rearrangement of the pixels.
STRONG_NOISE = 0.15
STRONG_ERASE = 0.1


def augment(key: jax.Array, x: jax.Array, view: str) -> jax.Array:
  """The digits' views of a batch `x` [n, 8, 8] in [0, 1] (jit-compatible).

  "weak" is the image itself (the reference's weak view is the un-augmented image); "strong"
  adds Gaussian noise (σ = 0.15), replaces 10% of the pixels by the image's mean, and clips to
  [0, 1].

  Args:
    key: PRNG key.
    x: images.
    view: "weak" or "strong".

  Returns:
    The augmented images, shaped like `x`.
  """
  if view == "weak":
    return x
  noise_key, erase_key = jax.random.split(key)
  noisy = x + STRONG_NOISE * jax.random.normal(noise_key, x.shape, x.dtype)
  erased = jax.random.bernoulli(erase_key, STRONG_ERASE, x.shape)
  mean = jnp.mean(x, axis=tuple(range(1, x.ndim)), keepdims=True)
  return jnp.clip(jnp.where(erased, mean, noisy), 0.0, 1.0)


def learned_rows(config, model, zoo, data, mode, accuracy, expert_val, expert_test):
  """Runs every recipe of `config.learned.run` on `mode`'s experts (frozen shared head).

  Args:
    config: configs/digits.py's config.
    model: the classifier module.
    zoo: the digits zoo.
    data: {task: TaskData}.
    mode: the experts' fine-tuning mode.
    accuracy: `accuracy(backbone, (x [T, n, ...], y [T, n])) -> [T]`.
    expert_val: the experts' validation accuracies.
    expert_test: the experts' test accuracies.

  Returns:
    `learned_table.learned_rows`'s (rows, info).
  """
  tasks = zoo.tasks
  head, base = zoo.pretrained["head"], zoo.pretrained["backbone"]
  apply = finetune.make_apply(model, mode=mode, base_backbone=base)

  def apply_fn(backbone, x, task):
    del task  # One shared, frozen head.
    return apply(backbone, head, x)

  def split(name):
    return [{"x": getattr(data[t], name).x, "y": getattr(data[t], name).y} for t in tasks]

  problem = learned.LearnProblem(
    apply_fn=apply_fn,
    base=base,
    experts=zoo.experts[mode],
    splits={"train": split("train"), "validation": split("val"), "test": split("test")},
    reference_accuracy=list(expert_val),
    augment=augment,
  )
  stacked = {
    "val": stack_splits([data[t].val for t in tasks]),
    "test": stack_splits([data[t].test for t in tasks]),
  }
  return learned_table.learned_rows(
    config.learned,
    problem,
    lambda backbone, name: accuracy(backbone, stacked[name]),
    expert_val,
    expert_test,
    mode=mode,
    seed=config.seed,
  )
