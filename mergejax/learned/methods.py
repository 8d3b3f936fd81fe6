"""AdaMerging, AdaMerging++, aTLAS and DV-BASI on the one parametrization and training loop.

Every method here is a choice of basis, granularity, objective and optimizer (all in the config;
see configs/*.py) handed to `loop.learn_coefficients`. DV-BASI adds an outer loop whose basis is
the difference vector δ = θ^(m−1) − θ0.

Conventions shared by all functions:

* `apply_fn(backbone_params, x, task_index) -> logits`: heads are closed over and frozen; only the
  backbone is merged. `task_index` is a Python int.
* `base` (θ0) and `experts` are backbone parameter trees (plain nested dicts of arrays).
* Data are per-task dicts {"x": [n, ...], "y": [n]} of arrays. Unsupervised objectives never see
  "y" (the loop drops it).
* `adapt_data` is the split Λ is trained on; `config.adapt_split` names it. When it is "test" the
  method is transductive and the result says so (`transductive=True`); reports must state it.
* `val_data` is used for early stopping and selection. Test data is never an argument here:
  evaluation on test is the caller's job, after selection.
"""

import json
import math
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from absl import logging

from mergejax import rules, sparsify
from mergejax import task_vectors as task_vectors_lib
from mergejax.learned import loop

Params = Any
Batch = dict[str, jax.Array]
ApplyFn = Callable[[Params, jax.Array, int], jax.Array]

BASES = ("task_vectors", "ties_trimmed", "dare")


def make_basis(
  base: Params, experts: Sequence[Params], basis: Mapping[str, Any], *, seed: int = 0
) -> list[Params]:
  """Builds the basis vectors named by `basis["name"]`.

  Args:
    base: θ0.
    experts: fine-tuned parameters.
    basis: {"name": "task_vectors" | "ties_trimmed" | "dare", "density": fraction kept: by the
      TIES trim (top-|τ| over the whole flattened task vector, as in the TIES paper), or DARE's
      keep probability (survivors rescaled by 1/density)}.
    seed: DARE's PRNG seed (one key per expert and leaf path, see `sparsify.random_drop`).

  Returns:
    The basis, one vector per expert.
  """
  vectors = task_vectors_lib.task_vectors(base, experts)
  if basis["name"] == "task_vectors":
    return vectors
  if basis["name"] == "ties_trimmed":
    return sparsify.trim_top_fraction(vectors, basis["density"], scope="model")
  if basis["name"] == "dare":
    return sparsify.random_drop(vectors, jax.random.key(seed), basis["density"])
  raise ValueError(f"Unknown basis {basis['name']!r}: use one of {BASES}.")


def learn_merge(
  apply_fn: ApplyFn,
  base: Params,
  experts: Sequence[Params],
  adapt_data: Sequence[Batch],
  config: Any,
  *,
  val_data: Sequence[Batch] | None = None,
  reference_accuracy: Sequence[float] | None = None,
  workdir: str | pathlib.Path | None = None,
) -> loop.LearnResult:
  """Learns Λ over the basis that `config.basis` makes from the experts.

  The body of AdaMerging, AdaMerging++ and aTLAS, which differ only in their configs.

  Args:
    apply_fn: `logits = apply_fn(backbone_params, x, task_index)`.
    base: θ0 backbone.
    experts: expert backbones, one per task (same order as the data).
    adapt_data: per-task data Λ is trained on (the split named by `config.adapt_split`).
    config: a config from configs/ (see configs/adamerging.py for the fields).
    val_data: per-task validation data, for early stopping and selection.
    reference_accuracy: per-task expert validation accuracy (normalized-accuracy selection).
    workdir: checkpoint directory (resumable); None for no checkpoints.

  Returns:
    The `LearnResult`; `result.params` is the merged backbone.
  """
  if len(experts) != len(adapt_data):
    raise ValueError(f"{len(experts)} experts but {len(adapt_data)} tasks of adapt_data.")
  basis = make_basis(base, experts, config.basis, seed=config.seed)
  return loop.learn_coefficients(
    apply_fn,
    base,
    basis,
    adapt_data,
    config,
    val_data=val_data,
    reference_accuracy=reference_accuracy,
    workdir=workdir,
  )


def _check_method(config: Any, *names: str) -> None:
  if config.method not in names:
    raise ValueError(f"This function runs {names}, but config.method is {config.method!r}.")


def adamerging(apply_fn, base, experts, adapt_data, config, **kwargs) -> loop.LearnResult:
  """AdaMerging (Yang et al., ICLR 2024): entropy on unlabeled test inputs, Λ in [0, 1].

  Task-wise or layer-wise per `config.coefficients.granularity` (configs/adamerging.py,
  configs/adamerging_taskwise.py). Transductive with the paper's `adapt_split="test"`.

  Args:
    apply_fn: `logits = apply_fn(backbone_params, x, task_index)`.
    base: θ0 backbone.
    experts: expert backbones.
    adapt_data: per-task unlabeled inputs (test split in the paper).
    config: configs/adamerging.py or a variant.
    **kwargs: `val_data`, `reference_accuracy`, `workdir` as for `learn_merge`.

  Returns:
    The `LearnResult`.
  """
  _check_method(config, "adamerging", "adamerging_plus")
  return learn_merge(apply_fn, base, experts, adapt_data, config, **kwargs)


def adamerging_plus(apply_fn, base, experts, adapt_data, config, **kwargs) -> loop.LearnResult:
  """AdaMerging++: AdaMerging over TIES-trimmed task vectors (configs/adamerging_plus.py).

  Args:
    apply_fn: `logits = apply_fn(backbone_params, x, task_index)`.
    base: θ0 backbone.
    experts: expert backbones.
    adapt_data: per-task unlabeled inputs.
    config: configs/adamerging_plus.py (basis.name == "ties_trimmed").
    **kwargs: as for `learn_merge`.

  Returns:
    The `LearnResult`.
  """
  _check_method(config, "adamerging_plus")
  if config.basis.name != "ties_trimmed":
    raise ValueError('AdaMerging++ needs config.basis.name == "ties_trimmed".')
  return learn_merge(apply_fn, base, experts, adapt_data, config, **kwargs)


def atlas(apply_fn, base, experts, adapt_data, config, **kwargs) -> loop.LearnResult:
  """aTLAS (Zhang et al., NeurIPS 2024): layer-wise Λ from 0; supervised or unsupervised.

  Supervised (configs/atlas.py): cross-entropy on the validation splits, AdamW, gradient clipping,
  best epoch by validation accuracy. Unsupervised (configs/atlas_unsupervised.py): FixMatch-style
  pseudo-labels on unlabeled training inputs.

  Args:
    apply_fn: `logits = apply_fn(backbone_params, x, task_index)`.
    base: θ0 backbone.
    experts: expert backbones.
    adapt_data: per-task data (validation split, labeled, for the supervised recipe).
    config: configs/atlas.py or configs/atlas_unsupervised.py.
    **kwargs: as for `learn_merge` (`val_data` selects the best epoch).

  Returns:
    The `LearnResult`.
  """
  _check_method(config, "atlas")
  return learn_merge(apply_fn, base, experts, adapt_data, config, **kwargs)


class DVBasiResult(NamedTuple):
  """What `dv_basi` returns.

  Attributes:
    params: θ^(m*) for the outer iteration m* best on validation.
    best_iteration: m* (0 is the starting model θ^(0)).
    val_metrics: validation selection metric of θ^(0), θ^(1), ..., θ^(M).
    iterations: the `LearnResult` of each outer iteration 1..M (params dropped to save memory).
    transductive: True if any stage adapted on unlabeled test inputs.
  """

  params: Params
  best_iteration: int
  val_metrics: list[float]
  iterations: list[loop.LearnResult]
  transductive: bool


def dv_basi(
  apply_fn: ApplyFn,
  base: Params,
  start: Params,
  adapt_data: Sequence[Batch],
  val_data: Sequence[Batch],
  config: Any,
  *,
  reference_accuracy: Sequence[float] | None = None,
  workdir: str | pathlib.Path | None = None,
  start_transductive: bool = False,
) -> DVBasiResult:
  """DV-BASI (Wang et al., AAAI 2026): restart a stagnated search along difference vectors.

  For m = 1..M: δ = θ^(m−1) − θ0; learn block-wise Λ (fresh init and optimizer state each
  iteration) for θ^(m−1) + Λ ⊙ δ with early stopping on validation; θ^(m) = θ^(m−1) + Λ* ⊙ δ.
  The returned model is the iterate best on *validation* (θ^(0) included), never on test.

  Args:
    apply_fn: `logits = apply_fn(backbone_params, x, task_index)`.
    base: θ0 backbone.
    start: θ^(0), e.g. aTLAS's merged backbone (`start_from_experts` builds it).
    adapt_data: per-task data for the objective (validation splits when supervised).
    val_data: per-task validation data for early stopping and the choice of iteration.
    config: configs/dv_basi.py or configs/dv_basi_unsupervised.py.
    reference_accuracy: per-task expert validation accuracy (normalized-accuracy selection).
    workdir: checkpoint root; iteration m checkpoints under `workdir/outer_<m>`, so a killed run
      resumes inside the iteration it was in.
    start_transductive: whether θ^(0) itself was adapted on test inputs.

  Returns:
    The `DVBasiResult`.
  """
  _check_method(config, "dv_basi")
  evaluate = loop.make_params_evaluator(apply_fn, eval_batch_size=config.train.eval_batch_size)

  def validate(params):
    return loop.selection_metric(
      evaluate(params, val_data), config.early_stopping.metric, reference_accuracy
    )

  current = start
  val_metrics = [validate(current)]
  best_iteration, best_params = 0, current
  iterations = []
  for m in range(1, config.dv_basi.outer_iterations + 1):
    # Cumulative displacement from θ0; fp32 so repeated iterations do not round in bf16.
    delta = jax.tree.map(lambda c, b: c.astype(jnp.float32) - b.astype(jnp.float32), current, base)
    result = loop.learn_coefficients(
      apply_fn,
      current,
      [delta],
      adapt_data,
      config,
      val_data=val_data,
      reference_accuracy=reference_accuracy,
      workdir=None if workdir is None else pathlib.Path(workdir) / f"outer_{m}",
    )
    current = result.params
    val_metrics.append(validate(current))
    iterations.append(result._replace(params=None))
    logging.info(
      "DV-BASI iteration %d: validation %s = %.5f", m, config.early_stopping.metric, val_metrics[-1]
    )
    # Strict improvement: ties keep the earlier (fewer-iteration) model.
    if val_metrics[-1] > val_metrics[best_iteration]:
      best_iteration, best_params = m, current
  return DVBasiResult(
    params=best_params,
    best_iteration=best_iteration,
    val_metrics=val_metrics,
    iterations=iterations,
    transductive=start_transductive or config.adapt_split == "test",
  )


def start_from_experts(
  apply_fn: ApplyFn,
  base: Params,
  experts: Sequence[Params],
  splits: Mapping[str, Sequence[Batch]],
  config: Any,
  *,
  reference_accuracy: Sequence[float] | None = None,
  workdir: str | pathlib.Path | None = None,
) -> tuple[Params, bool]:
  """Builds DV-BASI's θ^(0) as `config.dv_basi.start` says.

  Args:
    apply_fn: `logits = apply_fn(backbone_params, x, task_index)`.
    base: θ0 backbone.
    experts: expert backbones.
    splits: {"train": ..., "validation": ..., "test": ...} per-task data.
    config: a DV-BASI config; `config.start` is the learned method's config when
      `dv_basi.start == "learned"`, else `dv_basi.start` names a `mergejax.rules` rule used with
      `dv_basi.start_hparams`.
    reference_accuracy: per-task expert validation accuracy.
    workdir: checkpoint directory of the start run.

  Returns:
    `(θ^(0), transductive)`.
  """
  if config.dv_basi.start == "learned":
    result = run(
      apply_fn,
      base,
      experts,
      splits,
      config.start,
      reference_accuracy=reference_accuracy,
      workdir=workdir,
    )
    return result.params, result.transductive
  merged = rules.merge(config.dv_basi.start, base, list(experts), **config.dv_basi.start_hparams)
  return merged, False


def run(
  apply_fn: ApplyFn,
  base: Params,
  experts: Sequence[Params],
  splits: Mapping[str, Sequence[Batch]],
  config: Any,
  *,
  reference_accuracy: Sequence[float] | None = None,
  workdir: str | pathlib.Path | None = None,
) -> loop.LearnResult | DVBasiResult:
  """Runs `config.method` on a benchmark's splits: the one entry for benchmarks and launchers.

  Picks `splits[config.adapt_split]` as adaptation data and `splits["validation"]` for
  selection; `splits["test"]` is read only when `config.adapt_split == "test"` (transductive,
  inputs only: the loop drops labels for unsupervised objectives).

  Args:
    apply_fn: `logits = apply_fn(backbone_params, x, task_index)`.
    base: θ0 backbone.
    experts: expert backbones, one per task.
    splits: {"train"?, "validation", "test"?} -> per-task data dicts.
    config: any config under configs/.
    reference_accuracy: per-task expert validation accuracy (normalized-accuracy selection).
    workdir: checkpoint root; None for none.

  Returns:
    `LearnResult`, or `DVBasiResult` for DV-BASI; `.params` is the merged backbone.
  """
  val_data = splits.get("validation")
  common = dict(reference_accuracy=reference_accuracy)
  if config.method == "dv_basi":
    start_dir = None if workdir is None else pathlib.Path(workdir) / "start"
    start, start_transductive = start_from_experts(
      apply_fn, base, experts, splits, config, workdir=start_dir, **common
    )
    return dv_basi(
      apply_fn,
      base,
      start,
      splits[config.adapt_split],
      val_data,
      config,
      workdir=workdir,
      start_transductive=start_transductive,
      **common,
    )
  method = {"adamerging": adamerging, "adamerging_plus": adamerging_plus, "atlas": atlas}
  if config.method not in method:
    raise ValueError(f"Unknown method {config.method!r}.")
  return method[config.method](
    apply_fn,
    base,
    experts,
    splits[config.adapt_split],
    config,
    val_data=val_data,
    workdir=workdir,
    **common,
  )


def learn_and_evaluate(config: Any, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Runs `config.method` on `config.problem` and reports test accuracy of the selected model.

  The library function behind launch/learn_merge.py, as one story: build the problem, learn
  (resumable under `workdir`), evaluate the selected model once on test, write results.json and
  the plots. Only `config.problem == "synthetic"` is built in here; other benchmarks call `run`.

  Args:
    config: any config under configs/.
    workdir: output directory (checkpoints, results.json, *.png).

  Returns:
    The results dict written to results.json.
  """
  from mergejax.benchmarks import synthetic  # noqa: PLC0415
  from mergejax.benchmarks.common import learned_plots as plots  # noqa: PLC0415 (matplotlib)

  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  # 1. Problem.
  if config.problem != "synthetic":
    raise ValueError(
      f"learn_and_evaluate builds only the synthetic problem, not {config.problem!r}."
    )
  problem = synthetic.make_problem(config.seed, **config.synthetic)
  splits = {"train": problem.train, "validation": problem.val, "test": problem.test}
  evaluate = loop.make_params_evaluator(problem.apply_fn)
  reference_val = [
    evaluate(e, [problem.val[t]])[0]["accuracy"] for t, e in enumerate(problem.experts)
  ]
  # 2. Learn (selection on validation only).
  result = run(
    problem.apply_fn,
    problem.base,
    problem.experts,
    splits,
    config,
    reference_accuracy=reference_val,
    workdir=workdir,
  )
  # 3. Test, once, on the selected model.
  test = evaluate(result.params, problem.test)
  reference_test = [
    evaluate(e, [problem.test[t]])[0]["accuracy"] for t, e in enumerate(problem.experts)
  ]
  accuracy = [m["accuracy"] for m in test]
  results = {
    "method": config.method,
    "adapt_split": config.adapt_split,
    "transductive": result.transductive,
    "note": (
      "Λ was adapted on unlabeled TEST inputs (transductive)."
      if result.transductive
      else "No test input was used before the final evaluation."
    ),
    "test_accuracy": accuracy,
    "test_accuracy_mean": float(sum(accuracy) / len(accuracy)),
    "test_normalized_accuracy_mean": float(
      sum(a / r for a, r in zip(accuracy, reference_test, strict=True)) / len(accuracy)
    ),
  }
  # 4. Plots.
  if isinstance(result, DVBasiResult):
    results.update(best_iteration=result.best_iteration, val_metrics=result.val_metrics)
    plots.plot_dv_basi_trajectory(
      result.val_metrics, workdir / "dv_basi_trajectory.png", best_iteration=result.best_iteration
    )
    last = result.iterations[-1]
  else:
    best_metric = None if math.isnan(result.best_metric) else result.best_metric  # JSON has no NaN.
    results.update(best_step=result.best_step, best_metric=best_metric)
    last = result
  plots.plot_coefficients(last.coeffs, last.blocks.names, workdir / "coefficients.png")
  plots.plot_curves(last.history, workdir / "curves.png")
  (workdir / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
  logging.info("%s", json.dumps(results, indent=2))
  return results
