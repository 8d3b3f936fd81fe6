"""Learned merging in a benchmark table: every recipe of configs/learned/ on one `LearnProblem`.

Each recipe runs through `mergejax.learned.run`; its row is named by the recipe's `label` (with
† when it adapted on unlabeled test inputs) and carries what it selected on validation
(`LearnedMerge.selected`). Test is evaluated once, for the model the method selected. One
`CompileCache` per problem shares compilations between recipes whose configs agree (e.g.
AdaMerging and AdaMerging++, aTLAS and DV-BASI's aTLAS start).
"""

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from absl import logging

from mergejax import learned
from mergejax.benchmarks.common import evaluate
from mergejax.tree import Params

TRANSDUCTIVE_MARK = " †"
TRANSDUCTIVE_FOOTNOTE = (
  "† transductive: Λ was adapted on the unlabeled test inputs (the method's published recipe); "
  "no test label was used for training or selection."
)


def recipe_config(recipe: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
  """A copy of `recipe` with `seed` (and its DV-BASI start recipe's seed) set."""
  cfg = recipe.copy_and_resolve_references()
  cfg.seed = seed
  if "start" in cfg:
    cfg.start.seed = seed
  return cfg


def describe(cfg: ml_collections.ConfigDict) -> str:
  """One line describing a learned recipe as it was run (for the notes under the table)."""
  tc, cc = cfg.train, cfg.coefficients
  length = f"{tc.epochs} epochs ({tc.epoch_length})" if tc.epochs > 0 else f"{tc.steps} steps"
  objective = ", ".join(f"{k}={v}" for k, v in cfg.objective.items() if k != "name")
  text = (
    f"Λ {cc.granularity}-wise over {cfg.basis.name}"
    + (f", clamped to {tuple(cc.clamp)} ({cc.clamp_mode})" if cc.clamp else "")
    + f", {cfg.objective.name}{f' ({objective})' if objective else ''} on {cfg.adapt_split}, "
    f"{cfg.optim.name} lr {cfg.optim.learning_rate:g}, {length}, "
    f"{tc.batches_per_step} x batch {tc.batch_size}/task per step"
  )
  if tc.eval_every >= 0:
    text += f", selected by validation {cfg.early_stopping.metric}"
  if cfg.method == "dv_basi":
    text += (
      f"; {cfg.dv_basi.outer_iterations} outer iterations (patience "
      f"{cfg.early_stopping.patience}), best on validation; start: {describe(cfg.start)}"
    )
  return text


def learned_rows(
  learned_config: ml_collections.ConfigDict,
  problem: learned.LearnProblem,
  accuracy: Callable[[Params, str], np.ndarray],
  expert_val: Sequence[float],
  expert_test: Sequence[float],
  *,
  mode: str,
  seed: int,
  cache: learned.CompileCache | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Runs every recipe of `learned_config.run` on `problem`.

  Args:
    learned_config: a benchmark config's `learned` section (`run`, `methods`, `seeds`).
    problem: the merging problem (the experts of one fine-tuning mode).
    accuracy: `accuracy(backbone, split) -> [T]` for split "val" or "test".
    expert_val: the experts' validation accuracies (normalized accuracy's reference).
    expert_test: the experts' test accuracies.
    mode: the experts' fine-tuning mode (the rows' "experts" column).
    seed: the run's seed; each recipe runs once per offset in `learned_config.seeds`.
    cache: compilations to share (valid for `problem.apply_fn` and `augment`, e.g. across
      seeds whose problems differ only in their arrays); None: a new one.

  Returns:
    (rows, {"results": {name: first run's LearnedMerge (params dropped)}, "recipes": {label:
    text}, "timing": {key: seconds}}).
  """
  # Recipes that agree on a step's config share its compilation.
  cache = learned.CompileCache() if cache is None else cache
  rows, results, recipes, timing = [], {}, {}, {}
  for name in tqdm.tqdm(learned_config.run, desc=f"learned merging ({mode})", leave=False):
    start = time.time()
    val_runs, test_runs, selected = [], [], []
    for offset in learned_config.seeds:
      cfg = recipe_config(learned_config.methods[name], seed + offset)
      result = learned.run(problem, cfg, cache=cache)
      val_runs.append(accuracy(result.params, "val"))
      test_runs.append(accuracy(result.params, "test"))
      selected.append(result.selected)
      if name not in results:
        results[name] = result._replace(params=None)
    transductive = bool(result.transductive)
    label = cfg.label + (TRANSDUCTIVE_MARK if transductive else "")
    recipes[label] = describe(cfg)
    chosen = (
      selected[0] if len(selected) == 1 else {k: [s[k] for s in selected] for k in selected[0]}
    )
    row = evaluate.result_row(
      label,
      mode,
      chosen,
      np.mean(test_runs, axis=0),
      expert_test,
      np.mean(val_runs, axis=0),
      transductive=transductive,
    )
    if len(test_runs) > 1:
      # Spread over the learned methods' seeds (the zoo is fixed within one run).
      per_run = [evaluate.summarize(t, expert_test) for t in test_runs]
      row["seeds"] = [seed + o for o in learned_config.seeds]
      row["test_runs"] = [[float(a) for a in t] for t in test_runs]
      row["avg_std"] = float(np.std([p["avg"] for p in per_run]))
      row["norm_std"] = float(np.std([p["norm"] for p in per_run]))
    rows.append(row)
    timing[f"{name} ({mode})"] = {"runs": len(test_runs), "seconds": round(time.time() - start, 2)}
    logging.info("%s (%s): test norm %.4f", label, mode, row["norm"])
  return rows, {"results": results, "recipes": recipes, "timing": timing}


def _jsonable(value: Any) -> Any:
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [_jsonable(v) for v in value]
  if isinstance(value, jax.Array | np.ndarray | np.generic):
    return np.asarray(value).tolist()
  return value


def learned_summary(results: Mapping[str, Mapping[str, learned.LearnedMerge]]) -> dict[str, Any]:
  """JSON-friendly records of each learned method (first run): selection, history, extras.

  Args:
    results: {mode: {method name: LearnedMerge}}.

  Returns:
    {"<name> (<mode>)": {"selected", "transductive", "history", **extras}}.
  """
  out = {}
  for mode, by_name in results.items():
    for name, r in by_name.items():
      out[f"{name} ({mode})"] = _jsonable(
        {
          "selected": r.selected,
          "transductive": r.transductive,
          "history": r.history,
          **r.extras,
        }
      )
  return out


def plot_learned(learned_config, results, tasks, workdir) -> dict[str, str]:
  """Λ heatmap, loss/validation curves and DV-BASI's trajectory for the first learned mode.

  Args:
    learned_config: the benchmark config's `learned` section (`plot_method`, `methods`).
    results: {mode: {method name: LearnedMerge}}.
    tasks: task names.
    workdir: output directory (pathlib.Path).

  Returns:
    {plot name: path}.
  """
  from mergejax.benchmarks.common import learned_plots  # noqa: PLC0415  (matplotlib)

  mode = next(iter(results))
  by_name, paths = results[mode], {}
  name = learned_config.plot_method
  coeffs = by_name[name].extras.get("effective_coeffs") if name in by_name else None
  if coeffs is not None:
    label = learned_config.methods[name].label
    vector_names = list(tasks) if np.shape(coeffs)[0] == len(tasks) else None
    paths["learned_coefficients"] = str(
      learned_plots.plot_coefficients(
        coeffs,
        by_name[name].extras["blocks"],
        workdir / "learned_coefficients.png",
        vector_names=vector_names,
        title=f"Λ of {label} ({mode})",
      )
    )
  for name, r in by_name.items():
    paths[f"learned_curves_{name}"] = str(
      learned_plots.plot_curves(r.history, workdir / f"learned_curves_{name}.png")
    )
    if "trajectory" in r.extras:
      paths[f"trajectory_{name}"] = str(
        learned_plots.plot_dv_basi_trajectory(
          r.extras["trajectory"],
          workdir / f"{name}_trajectory.png",
          best_iteration=r.extras["best_iteration"],
        )
      )
  return paths


def learned_notes(recipes: Mapping[str, str], rows: Sequence[Mapping[str, Any]]) -> str:
  """The footnote, each learned recipe as run, and the spread of multi-seed learned rows."""
  lines = [
    TRANSDUCTIVE_FOOTNOTE,
    "",
    "Learned methods as run (test evaluated once, after selection):",
  ]
  lines += [f"- {label}: {text}" for label, text in recipes.items()]
  spread = [r for r in rows if "seeds" in r]
  if spread:
    lines += ["", f"Learned rows are means over seeds {spread[0]['seeds']} (same zoo); std:"]
    lines += [
      f"- {r['method']} ({r['fine_tuning']}): avg ± {100 * r['avg_std']:.1f}, "
      f"norm ± {100 * r['norm_std']:.1f}"
      for r in spread
    ]
  return "\n".join(lines)
