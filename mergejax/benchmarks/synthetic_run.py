"""Learned merging on the synthetic problem, from a config to results.json and plots.

The library function behind launch/learn_merge.py, as one story: build the problem, learn
(resumable under `workdir`), evaluate the selected model once on test, write results.json and
the plots.
"""

import json
import pathlib
from typing import Any

from absl import logging

from mergejax import learned
from mergejax.benchmarks import synthetic
from mergejax.distributed import hosts
from mergejax.learned import evaluation, sharding


def learn_and_evaluate(config: Any, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Runs the recipe `config` on `config.synthetic`'s problem; reports the selected model's test.

  Args:
    config: any recipe under configs/learned/ (`config.problem` must be "synthetic").
    workdir: output directory (checkpoints, results.json, *.png).

  Returns:
    The results dict written to results.json.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  # 1. Problem.
  if config.problem != "synthetic":
    raise ValueError(
      f"learn_and_evaluate builds only the synthetic problem, not {config.problem!r}."
    )
  raw = synthetic.make_problem(config.seed, **config.synthetic)
  problem = synthetic.learn_problem(raw)
  # 2. Learn (selection on validation only).
  result = learned.run(problem, config, workdir=workdir)
  # 3. Test, once, on the selected model.
  evaluate = evaluation.make_evaluator(raw.apply_fn).metrics
  accuracy = [m["accuracy"] for m in evaluate(result.params, raw.test)]
  reference = [evaluate(e, raw.test)[t]["accuracy"] for t, e in enumerate(raw.experts)]
  results = {
    "method": config.method,
    "label": config.label,
    "adapt_split": config.adapt_split,
    "transductive": result.transductive,
    "note": (
      "Λ was adapted on unlabeled TEST inputs (transductive)."
      if result.transductive
      else "No test input was used before the final evaluation."
    ),
    "selected": result.selected,
    "test_accuracy": accuracy,
    "test_accuracy_mean": float(sum(accuracy) / len(accuracy)),
    "test_normalized_accuracy_mean": float(
      sum(a / r for a, r in zip(accuracy, reference, strict=True)) / len(accuracy)
    ),
    "distributed": sharding.describe(sharding.make_mesh(config)),
  }
  if not hosts.is_primary():  # One writer per file: process 0 writes results and plots.
    return results
  from mergejax.benchmarks.common import learned_plots as plots  # noqa: PLC0415 (matplotlib)

  # 4. Plots.
  extras = result.extras
  if "trajectory" in extras:
    results["trajectory"] = extras["trajectory"]
    plots.plot_dv_basi_trajectory(
      extras["trajectory"],
      workdir / "dv_basi_trajectory.png",
      best_iteration=extras["best_iteration"],
    )
    if extras["iterations"]:
      coeffs = extras["iterations"][-1]["coeffs"]
      plots.plot_coefficients(coeffs, extras["blocks"], workdir / "coefficients.png")
  else:
    results["best_metric"] = extras["best_metric"]  # None without validation (JSON has no NaN).
    plots.plot_coefficients(
      extras["effective_coeffs"], extras["blocks"], workdir / "coefficients.png"
    )
  plots.plot_curves(result.history, workdir / "curves.png")
  (workdir / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
  logging.info("%s", json.dumps(results, indent=2))
  return results
