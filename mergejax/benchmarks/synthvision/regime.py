"""The synthvision regime checks of one zoo: reference accuracies and entropies, then every
statistic of `mergejax.benchmarks.common.regime` for one fine-tuning mode's experts.

The statistics are measured on validation where they could steer a choice (the trimmed and
DARE'd experts, the entropy-accuracy points, the disentanglement error) and on test where they
describe the references (zero-shot and expert accuracy).
"""

import itertools
from typing import Any

import jax
import ml_collections
import numpy as np

from mergejax import sparsify
from mergejax import task_vectors as tv_lib
from mergejax.benchmarks.common import regime as regime_lib
from mergejax.benchmarks.synthvision import zoo as zoo_lib


def reference_accuracies(zoo: zoo_lib.Zoo, mode: str) -> dict[str, Any]:
  """Accuracies and entropies of θ0, the experts and the multi-task model.

  Returns:
    {"zero_shot": {split: acc [T]}, "zero_shot_entropy": {split: [T]},
     "multitask": {split: [T]}, "multitask_entropy": {split: [T]}, "experts": {split: [T]}
     (each expert on its own task), "expert_matrix" / "expert_entropy": {"val": [T, T]}
     (expert i on task j; validation only, for the entropy-accuracy points)}.
  """
  keys = ("zero_shot", "zero_shot_entropy", "multitask", "multitask_entropy", "experts")
  out: dict[str, Any] = {k: {} for k in (*keys, "expert_matrix", "expert_entropy")}
  for split in ("val", "test"):
    out["zero_shot"][split], out["zero_shot_entropy"][split] = zoo.evaluate(zoo.base, split)
    out["multitask"][split], out["multitask_entropy"][split] = zoo.evaluate(zoo.multitask, split)
  rows = [zoo.evaluate(e, "val", mode) for e in zoo.experts[mode]]
  out["expert_matrix"]["val"] = np.stack([r[0] for r in rows])
  out["expert_entropy"]["val"] = np.stack([r[1] for r in rows])
  out["experts"]["val"] = np.diag(out["expert_matrix"]["val"])
  out["experts"]["test"] = np.array(
    [own_accuracy(zoo, e, t, "test", mode) for t, e in enumerate(zoo.experts[mode])]
  )
  return out


def own_accuracy(zoo: zoo_lib.Zoo, backbone, task: int, split: str, mode: str) -> float:
  """Accuracy of `backbone` on one task's split (one compilation serves every task)."""
  labels = getattr(zoo.data[zoo.tasks[task]], split).y
  return float(np.mean(zoo.predict_task(backbone, task, split, mode) == labels))


def measure_regime(
  zoo: zoo_lib.Zoo, config: ml_collections.ConfigDict, refs: dict[str, Any]
) -> dict[str, Any]:
  """Computes every regime statistic for the experts of `config.regime.mode`.

  Args:
    zoo: the zoo.
    config: configs/benchmark.py's config.
    refs: `reference_accuracies(zoo, mode)`.

  Returns:
    {"values": {statistic: value}, "details": {per-task and per-pair numbers}}.
  """
  rc, mode = config.regime, config.regime.mode
  base, experts = zoo.base, zoo.experts[mode]
  vectors = tv_lib.task_vectors(base, experts)
  zs_val, ex_val = refs["zero_shot"]["val"], refs["experts"]["val"]

  # Each expert's own task vector, trimmed (TIES, whole-model top-k) or DARE-dropped, on its task.
  trimmed = [sparsify.trim_top_fraction([v], rc.trim_density)[0] for v in vectors]
  key = jax.random.key(zoo.seed)
  dropped = [
    sparsify.random_drop([v], jax.random.fold_in(key, t), rc.dare_density)[0]
    for t, v in enumerate(vectors)
  ]
  trim_acc = [
    own_accuracy(zoo, tv_lib.apply(base, v), t, "val", mode) for t, v in enumerate(trimmed)
  ]
  dare_acc = [
    own_accuracy(zoo, tv_lib.apply(base, v), t, "val", mode) for t, v in enumerate(dropped)
  ]
  trim_gain = regime_lib.gain_retained(trim_acc, zs_val, ex_val)
  dare_gain = regime_lib.gain_retained(dare_acc, zs_val, ex_val)

  # Entropy against accuracy over (model, task) points: θ0, every expert on every task, multi-task.
  ent = np.concatenate(
    [
      refs["zero_shot_entropy"]["val"],
      refs["expert_entropy"]["val"].ravel(),
      refs["multitask_entropy"]["val"],
    ]
  )
  acc = np.concatenate([zs_val, refs["expert_matrix"]["val"].ravel(), refs["multitask"]["val"]])
  conflicts = regime_lib.sign_conflicts(trimmed)

  # Disentanglement error of task pairs on the α grid (validation inputs).
  predict = lambda params, t: zoo.predict_task(params, t, "val", mode)  # noqa: E731
  pairs = list(itertools.combinations(range(len(zoo.tasks)), 2))[: rc.max_pairs]
  coeffs = tuple(rc.disentanglement_coeffs)
  pair_errors = {}
  for i, j in pairs:
    xi = regime_lib.disentanglement_map(predict, base, (vectors[i], vectors[j]), (i, j), coeffs)
    pair_errors[f"{zoo.tasks[i]}+{zoo.tasks[j]}"] = float(xi.mean())
  i, j = pairs[0]
  map_coeffs = tuple(rc.map_coeffs)
  pair_map = regime_lib.disentanglement_map(
    predict, base, (vectors[i], vectors[j]), (i, j), map_coeffs
  )

  values = {
    "zero_shot_normalized": regime_lib.zero_shot_normalized(
      refs["zero_shot"]["test"], refs["experts"]["test"]
    ),
    "experts_accuracy": float(np.mean(refs["experts"]["test"])),
    "task_vector_relative_norm": regime_lib.task_vector_relative_norm(base, vectors),
    "mean_abs_pairwise_cosine": regime_lib.mean_abs_pairwise_cosine(vectors),
    "trim20_gain_retained": float(np.mean(trim_gain)),
    "dare90_gain_retained": float(np.mean(dare_gain)),
    "entropy_accuracy_spearman": regime_lib.spearman(ent, acc),
    "sign_conflicts_after_trim": conflicts["rate"],
    "sign_conflicts_random_baseline": conflicts["random_baseline"],
    "disentanglement_error": float(np.mean(list(pair_errors.values()))),
  }
  details = {
    "mode": mode,
    "trim20_gain_per_task": trim_gain.tolist(),
    "dare90_gain_per_task": dare_gain.tolist(),
    "trim20_val_accuracy": [float(a) for a in trim_acc],
    "dare90_val_accuracy": [float(a) for a in dare_acc],
    "relative_norms_expert0": regime_lib.relative_norms(base, vectors[0]),
    "sign_conflicts_overlap_fraction": conflicts["overlap_fraction"],
    "disentanglement_coeffs": list(coeffs),
    "disentanglement_per_pair": pair_errors,
    "disentanglement_map": {
      "pair": [zoo.tasks[i], zoo.tasks[j]],
      "coeffs": list(map_coeffs),
      "xi": pair_map.tolist(),
    },
    "entropy_accuracy_points": {"entropy": ent.tolist(), "accuracy": acc.tolist()},
  }
  return {"values": values, "details": details}
