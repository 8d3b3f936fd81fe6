"""Learned merging in the digits benchmark: every recipe of configs/learned/ on each mode's experts.

Each recipe is run through `mergejax.learned.run` on a `LearnProblem` built from the zoo (frozen
shared head, validation accuracies of the experts as the normalized-accuracy reference, the digits'
augmentations). Its row is named by the recipe's `label`; what it selected on validation comes from
`LearnedMerge.selected`. One `CompileCache` per mode shares compilations between recipes whose
configs agree (e.g. AdaMerging and AdaMerging++, aTLAS and DV-BASI's aTLAS start).
"""

import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import logging

from mergejax import finetune, learned
from mergejax.benchmarks.common import evaluate
from mergejax.benchmarks.common.data import stack_splits

TRANSDUCTIVE_MARK = " †"
TRANSDUCTIVE_FOOTNOTE = (
  "† transductive: Λ was adapted on the unlabeled test inputs (the method's published recipe); "
  "no test label was used for training or selection."
)
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


def _recipe_config(recipe: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
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


def learned_rows(config, model, zoo, data, mode, accuracy, expert_val, expert_test):
  """Runs every recipe of `config.learned.run` on `mode`'s experts.

  Returns:
    (rows, {"results": {name: first seed's LearnedMerge (params dropped)}, "recipes": {label:
    text}, "timing": {key: seconds}}).
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
  # One cache per apply_fn: recipes that agree on a step's config share its compilation.
  cache = learned.CompileCache()
  val = stack_splits([data[t].val for t in tasks])
  test = stack_splits([data[t].test for t in tasks])
  rows, results, recipes, timing = [], {}, {}, {}
  for name in tqdm.tqdm(config.learned.run, desc=f"learned merging ({mode})", leave=False):
    start = time.time()
    val_runs, test_runs, selected = [], [], []
    for offset in config.learned.seeds:
      cfg = _recipe_config(config.learned.methods[name], config.seed + offset)
      result = learned.run(problem, cfg, cache=cache)
      # Test is evaluated once, for the model the method selected (on validation).
      val_runs.append(accuracy(result.params, val))
      test_runs.append(accuracy(result.params, test))
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
      row["seeds"] = [config.seed + o for o in config.learned.seeds]
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


def learned_summary(results) -> dict[str, Any]:
  """JSON-friendly records of each learned method (first seed): selection, history, extras."""
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


def plot_learned(config, results, tasks, workdir) -> dict[str, str]:
  """Λ heatmap, loss/validation curves and DV-BASI's trajectory for the first learned mode."""
  from mergejax.benchmarks.common import learned_plots  # noqa: PLC0415  (matplotlib)

  mode = next(iter(results))
  by_name, paths = results[mode], {}
  name = config.learned.plot_method
  coeffs = by_name[name].extras.get("effective_coeffs") if name in by_name else None
  if coeffs is not None:
    label = config.learned.methods[name].label
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
