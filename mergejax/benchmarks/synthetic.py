"""A synthetic multi-task problem for learned merging: no downloads, seconds on CPU.

A flax MLP backbone θ0 with one frozen linear head per task. Expert t is θ0 + τ_t with a random
task vector τ_t, and task t's labels are expert t's own predictions on Gaussian inputs, so each
expert is perfect on its task by construction and a merged backbone has something to recover.
Used by the tests, launch/bench_adamerging.py and launch/learn_merge.py (config.problem;
`synthetic_run.learn_and_evaluate`). `learn_problem` wraps a `Problem` for `mergejax.learned`,
with `augment`'s views (weak: the inputs; strong: Gaussian noise of std `STRONG_NOISE`).
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mergejax import learned
from mergejax.learned import evaluation
from mergejax.models.mlp import MLPBackbone
from mergejax.tree import Params

STRONG_NOISE = 0.5  # Std of the strong view's noise; the inputs are standard normal.


class Problem(NamedTuple):
  """A synthetic merging problem.

  Attributes:
    apply_fn: `logits = apply_fn(backbone_params, x, task_index)` (heads closed over, frozen).
    base: θ0 backbone parameters.
    experts: one backbone per task.
    heads: one {"w", "b"} head per task.
    train: per-task {"x", "y"} (an unlabeled split for transductive use is `test` without "y").
    val: per-task {"x", "y"} validation split.
    test: per-task {"x", "y"} test split.
  """

  apply_fn: Callable[[Params, jax.Array, int], jax.Array]
  base: Params
  experts: list[Params]
  heads: list[Params]
  train: list[dict[str, jax.Array]]
  val: list[dict[str, jax.Array]]
  test: list[dict[str, jax.Array]]


def make_problem(
  seed: int = 0,
  *,
  num_tasks: int = 3,
  in_dim: int = 16,
  hidden: int = 32,
  depth: int = 2,
  num_classes: int = 4,
  num_train: int = 128,
  num_val: int = 64,
  num_test: int = 64,
  expert_scale: float = 0.5,
) -> Problem:
  """Builds a synthetic problem (see module docstring).

  Args:
    seed: PRNG seed; everything is a deterministic function of it.
    num_tasks: number of tasks/experts.
    in_dim: input features.
    hidden: backbone width.
    depth: backbone layers.
    num_classes: classes per task.
    num_train: examples per task in the train split (also the unlabeled adaptation split).
    num_val: examples per task in the validation split.
    num_test: examples per task in the test split.
    expert_scale: std of τ_t relative to each θ0 leaf's std.

  Returns:
    The `Problem`.
  """
  key = jax.random.key(seed)
  k_init, k_tv, k_head, k_data = jax.random.split(key, 4)
  model = MLPBackbone(width=hidden, depth=depth)
  base = model.init(k_init, jnp.zeros((1, in_dim)))["params"]

  def task_vector(k):
    leaves, treedef = jax.tree.flatten(base)
    keys = jax.random.split(k, len(leaves))
    return jax.tree.unflatten(
      treedef,
      [
        expert_scale * (jnp.std(p) + 1e-2) * jax.random.normal(kk, p.shape)
        for p, kk in zip(leaves, keys, strict=True)
      ],
    )

  experts = [jax.tree.map(jnp.add, base, task_vector(k)) for k in jax.random.split(k_tv, num_tasks)]
  heads = []
  for k in jax.random.split(k_head, num_tasks):
    heads.append(
      {
        "w": jax.random.normal(k, (hidden, num_classes)) / jnp.sqrt(hidden) * 3.0,
        "b": jnp.zeros((num_classes,)),
      }
    )

  def apply_fn(params, x, task):
    head = heads[task]
    return model.apply({"params": params}, x) @ head["w"] + head["b"]

  def split(k, n):
    out = []
    for t, kt in enumerate(jax.random.split(k, num_tasks)):
      x = jax.random.normal(kt, (n, in_dim))
      y = jnp.argmax(apply_fn(experts[t], x, t), axis=-1).astype(jnp.int32)
      out.append({"x": x, "y": y})
    return out

  k_train, k_val, k_test = jax.random.split(k_data, 3)
  return Problem(
    apply_fn=apply_fn,
    base=base,
    experts=experts,
    heads=heads,
    train=split(k_train, num_train),
    val=split(k_val, num_val),
    test=split(k_test, num_test),
  )


def augment(key: jax.Array, x: jax.Array, view: str) -> jax.Array:
  """The synthetic problem's views: "weak" is `x`, "strong" adds N(0, STRONG_NOISE²) noise.

  Args:
    key: PRNG key.
    x: inputs `[n, in_dim]`.
    view: "weak" or "strong".

  Returns:
    The view, shaped like `x`.
  """
  if view == "weak":
    return x
  return x + STRONG_NOISE * jax.random.normal(key, x.shape, x.dtype)


def learn_problem(problem: Problem) -> learned.LearnProblem:
  """The `LearnProblem` of a synthetic problem: its splits, views, and the experts' validation
  accuracies as the normalized-accuracy reference.

  Args:
    problem: from `make_problem`.

  Returns:
    The `mergejax.learned.LearnProblem`.
  """
  evaluate = evaluation.make_evaluator(problem.apply_fn).metrics
  # Expert t on task t, through task t's head (1.0 by construction: the labels are its own).
  reference = [evaluate(e, problem.val)[t]["accuracy"] for t, e in enumerate(problem.experts)]
  return learned.LearnProblem(
    apply_fn=problem.apply_fn,
    base=problem.base,
    experts=problem.experts,
    splits={"train": problem.train, "validation": problem.val, "test": problem.test},
    reference_accuracy=reference,
    augment=augment,
  )
