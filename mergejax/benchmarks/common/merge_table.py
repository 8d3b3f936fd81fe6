"""Data-free rules in a benchmark table: hyper-parameters selected on validation, test reported.

Every benchmark (digits, synthvision) runs its rules through `run_rule`: each point of a rule's
grid is merged with `rules.merge` and scored by mean normalized *validation* accuracy; the best
point (ties: the earliest, and grids list λ in increasing order) is merged once more, with the
inputs' NaN/Inf check, and evaluated on validation and test. Rules that return one model per task
(`rules.TaskSpecificMerge`: EMR, TALL masks, TSV-C) are scored task by task, each task with its
own model, as they are used (the task id is known at inference).
"""

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mergejax import rules
from mergejax import statistics as stats_lib
from mergejax.benchmarks.common import evaluate
from mergejax.tree import Params

# Row names in the printed tables.
RULE_LABELS = {
  "weight_average": "weight averaging",
  "task_arithmetic": "task arithmetic",
  "ties": "TIES",
  "dare": "DARE (task arithmetic)",
  "dare_ties": "DARE-TIES",
  "breadcrumbs": "Breadcrumbs",
  "della": "DELLA",
  "consensus": "Consensus (TA)",
  "tall_masks": "TALL masks (task id)",
  "emr": "EMR (task id)",
  "model_stock": "Model Stock",
  "magmax": "MagMax",
  "tsv_m": "TSV-M",
  "iso_c": "ISO-C",
  "iso_cts": "ISO-CTS",
  "tsv_c": "TSV-C (task id)",
  "fisher": "Fisher merging",
  "regmean": "RegMean",
  "regmean_plusplus": "RegMean++",
}

# accuracy(backbone, split) -> per-task accuracies [T] on that split ("val" or "test").
AccuracyFn = Callable[[Params, str], np.ndarray]


def grid_points(grid: Mapping[str, Sequence[Any]] | None) -> list[dict[str, Any]]:
  """Every combination of a grid {name: candidates}, in product order ([{}] for no grid)."""
  if not grid:
    return [{}]
  names = list(grid)
  return [dict(zip(names, values, strict=True)) for values in itertools.product(*grid.values())]


def select_on_validation(
  score_fn: Callable[[dict[str, Any]], Sequence[float]],
  grid: Mapping[str, Sequence[Any]] | None,
) -> tuple[dict[str, Any], float, list[tuple[dict[str, Any], np.ndarray]]]:
  """Evaluates `score_fn(hparams) -> per-task normalized val accuracy` over a grid; keeps the best.

  Ties go to the earliest grid point (grids list λ in increasing order).

  Args:
    score_fn: maps a hyper-parameter dict to per-task normalized validation accuracies.
    grid: {name: candidate values}; None or {} means a single, empty point.

  Returns:
    (best hparams, best mean score, [(hparams, per-task scores)] for every point).
  """
  trace = []
  best, best_score = None, -np.inf
  for point in grid_points(grid):
    scores = np.asarray(score_fn(point))
    trace.append((point, scores))
    if scores.mean() > best_score:
      best, best_score = point, float(scores.mean())
  return best, best_score, trace


def merged_accuracy(merged: Any, base: Params, num_tasks: int, accuracy: AccuracyFn, split: str):
  """Per-task accuracy of a merge; a `TaskSpecificMerge` scores task t with its model t."""
  if not isinstance(merged, rules.TaskSpecificMerge):
    return np.asarray(accuracy(merged, split))
  models = rules.task_models(merged, base, num_tasks)
  return np.array([np.asarray(accuracy(m, split))[t] for t, m in enumerate(models)])


def run_rule(
  rule: str,
  base: Params,
  experts: Sequence[Params],
  accuracy: AccuracyFn,
  expert_val: Sequence[float],
  grid: Mapping[str, Sequence[Any]] | None,
  extra: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray, list[tuple[dict[str, Any], np.ndarray]]]:
  """Selects `rule`'s hyper-parameters on validation, then evaluates the chosen merge.

  Args:
    rule: a key of `rules.REGISTRY`.
    base: θ0.
    experts: the experts, one per task.
    accuracy: `accuracy(backbone, split) -> [T]`.
    expert_val: the experts' own validation accuracies (normalized accuracy's reference).
    grid: {hyper-parameter: candidates}; None: the rule's defaults.
    extra: fixed arguments of every merge (a random rule's `key`, data statistics, ...).

  Returns:
    (best hparams, val accuracies [T], test accuracies [T], [(hparams, normalized val [T])]).
  """
  extra = dict(extra or {})
  num_tasks = len(experts)
  # λ sweeps: every registered rule's `scale` is the last step, θ0 + λ Δ, so a sweep merges once
  # per point of the other hyper-parameters and rescales Δ (`_ScaledSweep` checks this on the
  # sweep's first point and falls back to merging every point if it does not hold).
  sweep = _ScaledSweep(rule, base, experts, extra)

  def score(hp):
    # The inputs are checked for NaN/Inf once, by the final merge below; the sweep skips the
    # per-leaf device reductions.
    merged = sweep.merge(hp)
    val = merged_accuracy(merged, base, num_tasks, accuracy, "val")
    return evaluate.normalized_accuracy(val, expert_val)

  best, _, trace = select_on_validation(score, grid)
  merged = rules.merge(rule, base, experts, **best, **extra)
  val = merged_accuracy(merged, base, num_tasks, accuracy, "val")
  test = merged_accuracy(merged, base, num_tasks, accuracy, "test")
  return best, val, test, trace


def rule_row(
  rule: str,
  mode: str,
  base: Params,
  experts: Sequence[Params],
  accuracy: AccuracyFn,
  expert_val: Sequence[float],
  expert_test: Sequence[float],
  grid: Mapping[str, Sequence[Any]] | None,
  extra: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, list[float]] | None, int]:
  """`run_rule`, as a benchmark table reports it.

  Args:
    rule, base, experts, accuracy, expert_val, grid, extra: as `run_rule`.
    mode: the experts' fine-tuning mode (the row's "experts" column).
    expert_test: the experts' own test accuracies (normalized accuracy's reference).

  Returns:
    (the table row, its validation curve over λ or None without a "scale" grid, grid points).
  """
  best, val_acc, test_acc, trace = run_rule(rule, base, experts, accuracy, expert_val, grid, extra)
  curve = scale_curve(trace, expert_val) if grid and "scale" in grid else None
  label = RULE_LABELS.get(rule, rule)
  row = evaluate.result_row(label, mode, best, test_acc, expert_test, val_acc)
  return row, curve, len(trace)


class _ScaledSweep:
  """Merges for a validation sweep, reusing one merge per point of the non-λ hyper-parameters.

  `merge(hp)` returns `rules.merge(rule, ..., **hp)` when `hp` has no "scale"; with one, it merges
  once at scale 1 for the other values, Δ = merged − θ0, and returns θ0 + λ Δ (float32, cast to
  θ0's dtypes). That is the rule's own last step for every registered rule, up to float rounding
  (the selected point is merged exactly afterwards). The sweep's first non-zero λ is also merged
  by the rule and compared; a rule for which θ0 + λ Δ does not reproduce it within 1e-5 of |Δ|'s
  scale (or that returns a per-task merge) gets exact merges for every point.
  """

  def __init__(self, rule, base, experts, extra):
    self.rule, self.base, self.experts, self.extra = rule, base, experts, extra
    self.linear: bool | None = None  # Unknown until the first check.
    self._deltas: dict[str, Any] = {}

  def _exact(self, hp):
    return rules.merge(self.rule, self.base, self.experts, check_finite=False, **hp, **self.extra)

  def merge(self, hp: Mapping[str, Any]) -> Any:
    if "scale" not in hp or self.linear is False:
      return self._exact(hp)
    rest = {k: v for k, v in hp.items() if k != "scale"}
    key = repr(sorted(rest.items()))
    if key not in self._deltas:
      unit = self._exact({**rest, "scale": 1.0})
      if isinstance(unit, rules.TaskSpecificMerge):
        self.linear = False
        return self._exact(hp)
      self._deltas[key] = jax.tree.map(
        lambda m, b: jnp.asarray(m, jnp.float32) - jnp.asarray(b, jnp.float32), unit, self.base
      )
    if self.linear is None and hp["scale"] == 0:
      return self._exact(hp)  # λ = 0 says nothing about linearity: decide on the next λ.
    scaled = _rescale(self.base, self._deltas[key], hp["scale"])
    if self.linear is None:
      exact = self._exact(hp)
      self.linear = _close(exact, scaled, self._deltas[key], hp["scale"])
      return exact
    return scaled


@jax.jit
def _rescale(base, delta, scale):
  return jax.tree.map(
    lambda b, d: (jnp.asarray(b, jnp.float32) + scale * d).astype(b.dtype), base, delta
  )


def _close(exact, scaled, delta, scale) -> bool:
  leaves = zip(*(jax.tree.leaves(t) for t in (exact, scaled, delta)), strict=True)
  for e, s, d in leaves:
    tol = 1e-5 * (1.0 + abs(scale)) * (1.0 + float(jnp.max(jnp.abs(d))))
    if float(jnp.max(jnp.abs(jnp.asarray(e, jnp.float32) - jnp.asarray(s, jnp.float32)))) > tol:
      return False
  return True


def scale_curve(trace, reference: Sequence[float]) -> dict[str, list[float]]:
  """Best validation score at each λ (maximized over the other hyper-parameters).

  Args:
    trace: `run_rule`'s last output (points with a "scale").
    reference: the experts' validation accuracies.

  Returns:
    {"scale": [λ], "norm": [mean normalized val accuracy], "avg": [mean val accuracy]}.
  """
  by_scale: dict[float, np.ndarray] = {}
  for hp, norm in trace:
    s = float(hp["scale"])
    if s not in by_scale or norm.mean() > by_scale[s].mean():
      by_scale[s] = norm
  scales = sorted(by_scale)
  ref = np.asarray(reference)
  return {
    "scale": scales,
    "norm": [float(by_scale[s].mean()) for s in scales],
    "avg": [float((by_scale[s] * ref).mean()) for s in scales],
  }


def data_statistics(
  rule: str,
  apply_fns: Sequence[Callable[[Params, Any], Any]],
  experts: Sequence[Params],
  train: Sequence[Mapping[str, np.ndarray]],
  *,
  max_examples: int,
  batch_size: int,
) -> list[Any]:
  """Each expert's statistics for a data-dependent rule, from its own task's training data.

  Args:
    rule: "fisher", "regmean" or "regmean_plusplus".
    apply_fns: per task, `logits = apply_fn(backbone, x)` through the task's frozen head.
    experts: the experts' backbones, one per task.
    train: per task, {"x", "y"} training arrays.
    max_examples: examples per task (the first ones; FusionBench uses 256).
    batch_size: examples per batch.

  Returns:
    One statistics tree per expert, as `rules.merge(rule, ..., statistics=...)` takes them.
  """
  batches = [list(stats_lib.batched({"x": d["x"][:max_examples]}, batch_size)) for d in train]
  if rule == "fisher":  # Expected labels (the model's predictive distribution), per example.
    return [
      stats_lib.fisher_statistics(fn, expert, b)
      for fn, expert, b in zip(apply_fns, experts, batches, strict=True)
    ]
  if rule == "regmean":
    return [
      stats_lib.regmean_statistics(fn, expert, b)
      for fn, expert, b in zip(apply_fns, experts, batches, strict=True)
    ]
  if rule == "regmean_plusplus":
    return stats_lib.regmean_plusplus_statistics(list(apply_fns), experts, batches)
  raise ValueError(
    f"No statistics recipe for rule {rule!r}; known: fisher, regmean, regmean_plusplus."
  )
