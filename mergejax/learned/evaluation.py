"""Evaluation inside learned merging: per-task metrics of a merged model, and the selection metric.

Only the validation data (and, for objectives that prepare targets, the adaptation inputs) pass
through here during learning; test evaluation is the caller's job, after selection.
"""

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mergejax import losses
from mergejax.learned.problem import traced_task
from mergejax.tree import Params

Batch = dict[str, jax.Array]
ApplyFn = Callable[[Params, jax.Array, int], jax.Array]

SELECTION_METRICS = ("accuracy", "neg_entropy", "neg_cross_entropy")


class Evaluator(NamedTuple):
  """Chunked, jitted evaluation of merged parameters (one compilation per task and chunk shape).

  Attributes:
    metrics: `metrics(params, data) -> [per-task dict]`: "entropy" always; "cross_entropy" and
      "accuracy" when the data has "y".
    logits: `logits(params, task, x) -> numpy [n, classes]`.
  """

  metrics: Callable[[Params, Sequence[Batch]], list[dict[str, float]]]
  logits: Callable[[Params, int, Any], np.ndarray]


def make_evaluator(apply_fn: ApplyFn, *, eval_batch_size: int = 512) -> Evaluator:
  """Returns the `Evaluator` of `apply_fn`.

  Args:
    apply_fn: `logits = apply_fn(params, x, task_index)`, task_index a Python int (or traced,
      for a `TracedTaskApply`).
    eval_batch_size: examples per forward pass.

  Returns:
    The evaluator (host-side loop over tasks and chunks; jitted forward).
  """

  # One compilation per task, or one for all when apply_fn takes a traced task index.
  static = () if traced_task(apply_fn) else (2,)

  @functools.partial(jax.jit, static_argnums=static)
  def chunk_sums(params, batch, task):
    logits = apply_fn(params, batch["x"], task)
    n = logits.shape[0]
    sums = {"entropy": losses.entropy(logits) * n}
    if "y" in batch:
      sums["cross_entropy"] = losses.cross_entropy(logits, batch["y"]) * n
      sums["accuracy"] = losses.accuracy(logits, batch["y"]) * n
    return sums

  forward = jax.jit(apply_fn, static_argnums=static)

  def chunks(task_data):
    n = _num_examples(task_data)
    for start in range(0, n, eval_batch_size):
      yield jax.tree.map(lambda a, s=start: a[s : s + eval_batch_size], task_data)

  def metrics(params, data):
    results = []
    for task, task_data in enumerate(data):
      totals = None
      for chunk in chunks(task_data):
        sums = chunk_sums(params, chunk, task)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
      n = _num_examples(task_data)
      results.append({k: float(v) / n for k, v in jax.device_get(totals).items()})
    return results

  def logits(params, task, x):
    parts = [np.asarray(forward(params, c["x"], task)) for c in chunks({"x": x})]
    return np.concatenate(parts)

  return Evaluator(metrics=metrics, logits=logits)


def selection_metric(
  task_metrics: Sequence[Mapping[str, float]],
  name: str,
  reference_accuracy: Sequence[float] | None = None,
) -> float:
  """Reduces per-task validation metrics to one number; higher is better.

  Args:
    task_metrics: output of `Evaluator.metrics`.
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


def _num_examples(task_data: Batch) -> int:
  return int(jax.tree.leaves(task_data)[0].shape[0])
