"""Task-specific merge results: one shared part plus light per-task parts (EMR, TALL masks).

Some rules do not return one model but a compact description of one model per task, which needs
the task id at inference. They return a `TaskSpecificMerge`; everything downstream (the CLI, the
benchmarks, the CLIP pipeline) asks it for `task_model(base, t)`, or calls `task_models` for any
result, so no caller special-cases a rule.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from mergejax import tree as tree_lib
from mergejax.tree import Params, to_compute


class TaskSpecificMerge:
  """Base class of rule results that hold one model per task.

  Subclasses are pytrees (e.g. `jax.tree_util.register_dataclass` dataclasses) so a jitted rule
  can return them, and implement `num_tasks` and `task_model`.
  """

  @property
  def num_tasks(self) -> int:
    raise NotImplementedError

  def task_model(self, base: Params, task: int) -> Params:
    """Returns task `task`'s parameters, in the structure and dtypes of `base`.

    Args:
      base: pre-trained parameters θ0 (the full tree).
      task: task index, in the order of the experts.
    """
    raise NotImplementedError


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SubsetTaskSpecific(TaskSpecificMerge):
  """A task-specific merge of selected leaves (`include=` / `exclude=`), with the other leaves.

  Attributes:
    inner: the rule's result on the selected leaves (flat `{"a/b/c": leaf}` trees).
    rest: `{"a/b/c": leaf}` of the leaves that were not merged (θ0's, or the experts' mean).
  """

  inner: TaskSpecificMerge
  rest: dict[str, Any]

  @property
  def num_tasks(self) -> int:
    return self.inner.num_tasks

  def task_model(self, base: Params, task: int) -> Params:
    flat = tree_lib.flatten(base)
    chosen = {p: x for p, x in flat.items() if p not in self.rest}
    merged = self.inner.task_model(chosen, task)
    out = [merged[p] if p in merged else self.rest[p] for p in flat]
    return jax.tree.unflatten(jax.tree.structure(base), out)


@jax.jit
def _masked_apply_leaf(base: jax.Array, mask: jax.Array, vector: jax.Array, factor) -> jax.Array:
  return (to_compute(base) + factor * jnp.where(mask, vector, 0.0)).astype(base.dtype)


def masked_apply(base: Params, mask: Params, vector: Params, factor: Any = 1.0) -> Params:
  """Returns θ0 + factor · (m ⊙ τ), in float32, cast to the dtype of each base leaf.

  One jitted program per leaf, called eagerly or traced into a larger program alike: the
  streaming engine builds task models inside its per-leaf programs and `rules.merge`'s callers
  build them from its result, with the same bits (XLA fuses the multiply and the add into one
  rounding either way, which separate eager operations would not).

  Args:
    base: pre-trained parameters θ0 (their dtypes are the output's).
    mask: boolean leaves with the structure of `base`.
    vector: float32 task vector with the structure of `base`.
    factor: scalar, may be traced.

  Returns:
    Task parameters with the structure and dtypes of `base`.
  """
  return jax.tree.map(lambda b, m, v: _masked_apply_leaf(b, m, v, factor), base, mask, vector)


def task_models(result: Any, base: Params, num_tasks: int) -> list[Params]:
  """Returns one model per task for any rule's result.

  Args:
    result: what `rules.merge` returned: parameters, or a `TaskSpecificMerge`.
    base: pre-trained parameters θ0.
    num_tasks: T (the number of experts merged).

  Returns:
    `[θ for task 0, ..., θ for task T-1]`; for a single merged model, the same object T times.
  """
  if isinstance(result, TaskSpecificMerge):
    if result.num_tasks != num_tasks:
      raise ValueError(f"The result holds {result.num_tasks} task models, not {num_tasks}.")
    return [result.task_model(base, t) for t in range(num_tasks)]
  return [result] * num_tasks
