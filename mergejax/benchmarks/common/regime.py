"""Regime checks: is a benchmark in the regime where model merging is studied?

Each function computes one statistic from accuracies, entropies or task vectors, so it can be
tested on cases with a known answer; `TARGETS` holds the issue's targets and `check` compares.
The statistics (fractions in [0, 1] unless stated):

  zero_shot_normalized       mean over tasks of zero-shot accuracy / expert accuracy
  experts_accuracy           mean test accuracy of the experts on their own tasks
  task_vector_relative_norm  median over leaves of ||τ_leaf|| / ||θ0_leaf|| (mean over experts)
  mean_abs_pairwise_cosine   mean |cos(τ_i, τ_j)| over pairs of flattened task vectors
  trim20_gain_retained       (acc(θ0 + trim_20%(τ)) - acc(θ0)) / (acc(θt) - acc(θ0)), mean
  dare90_gain_retained       the same with DARE at p = 0.9
  entropy_accuracy_spearman  Spearman correlation of mean prediction entropy with accuracy over
                             (model, task) points (negative: confident where accurate)
  sign_conflicts_after_trim  fraction of entries, among those where at least two trimmed task
                             vectors are non-zero, whose non-zero values disagree in sign; its
                             random baseline keeps the supports and draws independent fair signs
  disentanglement_error      Ortiz-Jiménez et al. (2023): ξ(α1, α2) = Σ_t E_{x~D_t}
                             1[f(x; θ0 + α_t τ_t) != f(x; θ0 + α1 τ1 + α2 τ2)], in [0, 2]
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from mergejax import tree as tree_lib
from mergejax.tree import Params

# name: (comparison, bound); None = reported, no target.
TARGETS: dict[str, tuple[str, float] | None] = {
  "zero_shot_normalized": ("between", (0.35, 0.75)),
  "experts_accuracy": (">=", 0.90),
  "task_vector_relative_norm": ("<=", 0.05),
  "mean_abs_pairwise_cosine": ("<=", 0.10),
  "trim20_gain_retained": (">=", 0.90),
  "dare90_gain_retained": (">=", 0.90),
  "entropy_accuracy_spearman": ("<=", -0.3),
  "sign_conflicts_after_trim": None,
  "sign_conflicts_random_baseline": None,
  "disentanglement_error": None,
}


def zero_shot_normalized(zero_shot: Sequence[float], experts: Sequence[float]) -> float:
  """Mean over tasks of zero-shot accuracy / the task's expert accuracy.

  Args:
    zero_shot: per-task accuracy of the pre-trained model with the task heads.
    experts: per-task accuracy of each task's expert (same split).

  Returns:
    The mean ratio (a task whose expert scores 0 counts as 0).
  """
  z, e = np.asarray(zero_shot, np.float64), np.asarray(experts, np.float64)
  return float(np.mean(np.divide(z, e, out=np.zeros_like(z), where=e > 0)))


def relative_norms(base: Params, vector: Params) -> dict[str, float]:
  """{leaf path: ||τ_leaf|| / ||θ0_leaf||} (inf where θ0's leaf is 0 and τ's is not)."""
  b, v = tree_lib.flatten(base), tree_lib.flatten(vector)
  out = {}
  for path, leaf in b.items():
    nb = float(np.linalg.norm(np.asarray(leaf, np.float64)))
    nv = float(np.linalg.norm(np.asarray(v[path], np.float64)))
    out[path] = nv / nb if nb > 0 else (0.0 if nv == 0 else float("inf"))
  return out


def task_vector_relative_norm(base: Params, vectors: Sequence[Params]) -> float:
  """Median over leaves of ||τ_leaf|| / ||θ0_leaf||, averaged over the task vectors.

  Args:
    base: pre-trained parameters θ0.
    vectors: task vectors τt (the structure of `base`).

  Returns:
    The mean over t of the median over leaves.
  """
  return float(np.mean([np.median(list(relative_norms(base, v).values())) for v in vectors]))


def _flat(vector: Params) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(vector)])


def mean_abs_pairwise_cosine(vectors: Sequence[Params]) -> float:
  """Mean over pairs i < j of |cos(τ_i, τ_j)| of the flattened task vectors.

  Args:
    vectors: at least two task vectors with one structure.

  Returns:
    The mean absolute cosine (a zero vector has cosine 0 with everything).
  """
  if len(vectors) < 2:
    raise ValueError("mean_abs_pairwise_cosine needs at least two task vectors.")
  flat = np.stack([_flat(v) for v in vectors])
  norms = np.linalg.norm(flat, axis=1)
  unit = flat / np.where(norms > 0, norms, 1.0)[:, None]
  cos = unit @ unit.T
  i, j = np.triu_indices(len(vectors), 1)
  return float(np.mean(np.abs(cos[i, j])))


def gain_retained(
  processed: Sequence[float], zero_shot: Sequence[float], experts: Sequence[float]
) -> np.ndarray:
  """Per task, the fraction of the expert's gain over zero-shot that a processed expert keeps.

  Args:
    processed: accuracy of θ0 + process(τt) on task t (e.g. trimmed, DARE-dropped).
    zero_shot: accuracy of θ0 on task t.
    experts: accuracy of θt on task t.

  Returns:
    (processed - zero_shot) / (experts - zero_shot) per task; 1 where the expert gained nothing
    (nothing to lose), so a task with no gain does not divide by 0.
  """
  p, z, e = (np.asarray(a, np.float64) for a in (processed, zero_shot, experts))
  gain = e - z
  return np.where(gain > 0, (p - z) / np.where(gain > 0, gain, 1.0), 1.0)


def _average_ranks(x: np.ndarray) -> np.ndarray:
  order = np.argsort(x, kind="stable")
  ranks = np.empty(len(x))
  ranks[order] = np.arange(len(x), dtype=np.float64)
  # Ties share the mean of their ranks.
  _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
  sums = np.bincount(inverse, weights=ranks)
  return sums[inverse] / counts[inverse]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
  """Spearman's rank correlation (Pearson's on average ranks; ties share their mean rank).

  Args:
    x: values.
    y: values, one per x.

  Returns:
    The correlation in [-1, 1]; 0 when either side is constant.
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
    raise ValueError(f"spearman needs two 1-D arrays of one length >= 2, got {x.shape}, {y.shape}.")
  rx, ry = _average_ranks(x) - (len(x) - 1) / 2, _average_ranks(y) - (len(y) - 1) / 2
  denom = np.sqrt(np.sum(rx**2) * np.sum(ry**2))
  return float(np.sum(rx * ry) / denom) if denom > 0 else 0.0


def sign_conflicts(vectors: Sequence[Params]) -> dict[str, float]:
  """Sign conflicts of (trimmed) task vectors and their random-sign baseline.

  An entry counts when at least two vectors are non-zero there (only then can signs conflict);
  it conflicts when those non-zero values do not all share one sign. The baseline is the expected
  rate if each non-zero value had an independent fair sign, with the same supports: an entry with
  m non-zeros conflicts with probability 1 - 2^(1 - m).

  Args:
    vectors: task vectors (typically after TIES's top-20% trim).

  Returns:
    {"rate", "random_baseline", "overlap_fraction" (entries with >= 2 non-zeros / all entries)}.
  """
  flat = np.stack([_flat(v) for v in vectors])
  nonzero = (flat != 0).sum(axis=0)
  shared = nonzero >= 2
  if not shared.any():
    return {"rate": 0.0, "random_baseline": 0.0, "overlap_fraction": 0.0}
  conflict = (flat > 0).any(axis=0) & (flat < 0).any(axis=0)
  m = nonzero[shared].astype(np.float64)
  return {
    "rate": float(conflict[shared].mean()),
    "random_baseline": float(np.mean(1.0 - 2.0 ** (1.0 - m))),
    "overlap_fraction": float(shared.mean()),
  }


def disentanglement_map(
  predict: Callable[[Params, int], np.ndarray],
  base: Params,
  pair: tuple[Params, Params],
  tasks: tuple[int, int],
  coeffs: Sequence[float],
  coeffs2: Sequence[float] | None = None,
) -> np.ndarray:
  """Disentanglement error ξ(α1, α2) of a task pair on a grid (Ortiz-Jiménez et al. 2023).

  ξ(α1, α2) = Σ_{t in pair} mean_x 1[f_t(x; θ0 + α_t τ_t) != f_t(x; θ0 + α1 τ1 + α2 τ2)]: how
  often adding the other task's vector changes task t's predictions. 0 everywhere means the two
  vectors act on disjoint inputs (perfect weight disentanglement); the maximum is 2.

  Args:
    predict: `predict(params, task) -> labels` on that task's evaluation inputs.
    base: θ0.
    pair: (τ1, τ2).
    tasks: the task indices of τ1 and τ2 (passed to `predict`).
    coeffs: α1 values.
    coeffs2: α2 values (default: `coeffs`).

  Returns:
    [len(coeffs), len(coeffs2)] array of ξ.
  """
  coeffs2 = coeffs if coeffs2 is None else coeffs2
  t1, t2 = tasks
  add = lambda *terms: jax.tree.map(lambda b, *vs: b + sum(vs), base, *terms)  # noqa: E731
  scaled = lambda v, a: jax.tree.map(lambda x: a * x, v)  # noqa: E731
  alone1 = {a: predict(add(scaled(pair[0], a)), t1) for a in coeffs}
  alone2 = {a: predict(add(scaled(pair[1], a)), t2) for a in coeffs2}
  out = np.zeros((len(coeffs), len(coeffs2)))
  for i, a1 in enumerate(coeffs):
    for j, a2 in enumerate(coeffs2):
      both = add(scaled(pair[0], a1), scaled(pair[1], a2))
      out[i, j] = np.mean(predict(both, t1) != alone1[a1]) + np.mean(
        predict(both, t2) != alone2[a2]
      )
  return out


def check(name: str, value: Any) -> bool | None:
  """Whether `value` meets the target of `name` (None: reported only, or not a number)."""
  target = TARGETS.get(name)
  if target is None or value is None or not np.isfinite(value):
    return None
  op, bound = target
  if op == "between":
    return bool(bound[0] <= value <= bound[1])
  return bool(value >= bound) if op == ">=" else bool(value <= bound)


def target_text(name: str) -> str:
  """The target of `name` as text ("≥ 0.9", "between 0.35 and 0.75", "reported")."""
  target = TARGETS.get(name)
  if target is None:
    return "reported"
  op, bound = target
  if op == "between":
    return f"between {bound[0]:g} and {bound[1]:g}"
  return f"{'≥' if op == '>=' else '≤'} {bound:g}"


def regime_object(values: Mapping[str, Any]) -> dict[str, Any]:
  """{name: {"value", "target", "ok"}} in `TARGETS` order, then any extra entries as given."""
  out = {}
  for name in (*TARGETS, *(k for k in values if k not in TARGETS)):
    if name in values:
      v = values[name]
      out[name] = {"value": v, "target": target_text(name), "ok": check(name, v)}
  return out


def regime_markdown(regime: Mapping[str, Mapping[str, Any]]) -> str:
  """Renders `regime_object`'s output as a Markdown table (value, target, met?)."""
  lines = ["| regime check | value | target | met |", "|---|---|---|---|"]
  for name, r in regime.items():
    v = r["value"]
    text = f"{v:.4f}" if isinstance(v, float | int | np.floating) else str(v)
    ok = {True: "yes", False: "**no**", None: "-"}[r["ok"]]
    lines.append(f"| {name} | {text} | {r['target']} | {ok} |")
  return "\n".join(lines)
