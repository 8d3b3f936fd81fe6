"""The main job: the synthvision benchmark over seeds, with its regime checks first.

One story in phases, per seed (the pre-trained backbone and the heads are shared by every seed,
like a released CLIP checkpoint; the experts and the multi-task model are the seed's):

1. zoo: data pool, pre-trained backbone, heads, experts per fine-tuning mode, multi-task model
   (each cached under `config.cache_dir`);
2. references: zero-shot, experts and multi-task accuracy and entropy;
3. regime: every statistic of `mergejax.benchmarks.common.regime` for the experts of
   `config.regime.mode`, next to its target;
4. rules: hyper-parameters selected on validation (`common.merge_table`), test reported; the
   data-dependent ones (Fisher, RegMean, RegMean++) with each expert's statistics from
   `config.statistics.max_examples` training examples of its own task;
5. learned merging: every recipe of configs/learned/ (`common.learned_table`);

then the seeds are aggregated (mean ± std) and `results.json` / `results.md` are written with the
regime first, the table, the literature's orderings checked against it, and the plots.

Selection never looks at test: every grid point is scored on validation only. Recipes that
adapt on unlabeled test inputs (AdaMerging, aTLAS and DV-BASI unsupervised) are marked
transductive (†).
"""

import functools
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from absl import logging

from mergejax import learned, provenance, rules
from mergejax import task_vectors as tv_lib
from mergejax import tree as tree_lib
from mergejax.benchmarks.common import evaluate, learned_table, merge_table, plots
from mergejax.benchmarks.common import regime as regime_lib
from mergejax.benchmarks.synthvision import learned as learned_lib
from mergejax.benchmarks.synthvision import regime as sv_regime
from mergejax.benchmarks.synthvision import report
from mergejax.benchmarks.synthvision import zoo as zoo_lib

_row = evaluate.result_row


def run_seed(
  config: ml_collections.ConfigDict, seed: int, shared: dict[str, Any] | None = None
) -> dict[str, Any]:
  """Phases 1-5 for one seed.

  Args:
    config: configs/benchmark.py's config.
    seed: the seed of the experts, the multi-task model and the learned methods.
    shared: state kept across seeds: per mode, the first zoo's apply_fn and the learned methods'
      compilations (every seed shares θ0 and the heads, so its programs are the same).

  Returns:
    {"seed", "rows", "regime": {"values", "details"}, "references", "zoo", "curves", "cosine",
     "sign_conflicts", "selection", "learned", "expert_matrix_val", "seconds"}.
  """
  seconds = {}
  start = time.time()
  zoo = zoo_lib.load_or_build(config, seed)
  seconds["zoo"] = time.time() - start
  logging.info("Seed %d: zoo %s %s.", seed, zoo.key, "loaded" if zoo.cache_hit else "built")
  modes = tuple(config.zoo.modes)

  # 2. References per mode (zero-shot and multi-task are the same in every mode).
  start = time.time()
  refs = {mode: sv_regime.reference_accuracies(zoo, mode) for mode in modes}
  ref0 = refs[modes[0]]
  expert_test = {m: np.asarray(refs[m]["experts"]["test"]) for m in modes}
  expert_val = {m: np.asarray(refs[m]["experts"]["val"]) for m in modes}
  rows = [
    _row("pre-trained (zero-shot)", "-", {}, ref0["zero_shot"]["test"], expert_test[modes[0]]),
    _row("multi-task (joint training)", "-", {}, ref0["multitask"]["test"], expert_test[modes[0]]),
  ]
  seconds["references"] = time.time() - start

  # 3. Regime checks.
  start = time.time()
  measured = sv_regime.measure_regime(zoo, config, refs[config.regime.mode])
  seconds["regime"] = time.time() - start

  # 4-5. Per mode: experts, data-free rules, learned methods.
  curves, cosines, conflicts, selection = {}, {}, {}, {}
  learned_results, recipes = {}, {}
  start = time.time()
  for mode in modes:
    experts = zoo.experts[mode]
    rows.append(
      _row("fine-tuned (individual)", mode, {}, expert_test[mode], expert_test[mode])
      | {"val": [float(a) for a in expert_val[mode]]}
    )
    vectors = tv_lib.task_vectors(zoo.base, experts)
    cosines[mode] = plots.cosine_matrix(vectors).tolist()
    conflicts[mode] = plots.sign_conflict_rates(vectors)

    def accuracy(backbone, split, mode=mode):
      return zoo.evaluate(backbone, split, mode)[0]

    for rule in tqdm.tqdm(config.rules, desc=f"merging ({mode}, seed {seed})", leave=False):
      rule_start = time.time()
      grid = config.grids.get(rule)
      grid = grid.to_dict() if grid is not None else None
      extra = rules.add_key(rule, {}, seed)
      if rules.REGISTRY[rule].data_dependent:
        if mode == "linearized":  # Statistics of the Taylor model are not defined here.
          continue
        stats_start = time.time()
        extra["statistics"] = merge_table.data_statistics(
          rule,
          [functools.partial(zoo.apply_fn(mode), task=t) for t in range(len(zoo.tasks))],
          experts,
          zoo.learned_splits()["train"],
          **config.statistics.to_dict(),
        )
        selection[f"{rule} statistics ({mode})"] = round(time.time() - stats_start, 2)
      row, curve, points = merge_table.rule_row(
        rule, mode, zoo.base, experts, accuracy, expert_val[mode], expert_test[mode], grid, extra
      )
      rows.append(row)
      if curve is not None:
        curves[f"{rule} ({mode})"] = curve
      selection[f"{rule} ({mode})"] = {
        "grid_points": points,
        "seconds": round(time.time() - rule_start, 2),
      }
    if config.learned.enabled and mode in (config.learned.modes or modes):
      apply_fn, cache = _shared_compiles(shared, zoo, mode)
      mode_rows, info = learned_table.learned_rows(
        config.learned,
        learned_lib.problem(zoo, mode, expert_val[mode], apply_fn=apply_fn),
        accuracy,
        expert_val[mode],
        expert_test[mode],
        mode=mode,
        seed=seed,
        cache=cache,
      )
      rows.extend(mode_rows)
      selection.update(info["timing"])
      learned_results[mode] = info["results"]
      recipes.update(info["recipes"])
  seconds["merges"] = time.time() - start
  references = {
    mode: {k: {s: np.asarray(v).tolist() for s, v in d.items()} for k, d in r.items()}
    for mode, r in refs.items()
  }
  return {
    "seed": seed,
    "rows": rows,
    "regime": measured,
    "references": references,
    "zoo": {
      "key": zoo.key,
      "cache_hit": zoo.cache_hit,
      "build": zoo.meta,
      "num_backbone_params": tree_lib.num_params(zoo.base),
    },
    "curves": curves,
    "cosine": cosines,
    "sign_conflicts": conflicts,
    "selection": selection,
    "learned_results": learned_results,
    "learned": learned_table.learned_summary(learned_results),
    "recipes": recipes,
    "seconds": {k: round(v, 2) for k, v in seconds.items()},
  }


def _shared_compiles(shared, zoo, mode):
  """(apply_fn, CompileCache) of `mode` shared with earlier seeds whose heads and θ0 are equal."""
  if shared is None:
    return None, None
  entry = shared.get(mode)
  same = entry is not None and all(
    np.array_equal(a, b)
    for a, b in zip(
      jax.tree.leaves((entry["heads"], entry["base"])),
      jax.tree.leaves((zoo.heads, zoo.base)),
      strict=True,
    )
  )
  if not same:
    entry = shared[mode] = {
      "apply_fn": zoo.apply_fn(mode),
      "cache": learned.CompileCache(),
      "heads": zoo.heads,
      "base": zoo.base,
    }
  return entry["apply_fn"], entry["cache"]


def run_benchmark(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Runs the benchmark over `config.seeds` and writes results.json, results.md and the plots.

  Args:
    config: configs/benchmark.py's config.
    workdir: output directory.

  Returns:
    The results payload (as written to results.json) plus "markdown".
  """
  started = time.time()
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  shared: dict[str, Any] = {}
  per_seed = [run_seed(config, seed, shared) for seed in config.seeds]
  first = per_seed[0]
  tasks = list(config.data.tasks)

  # Aggregate the seeds: the regime (mean, per seed) and every row (mean ± std).
  regime = regime_lib.regime_object(
    {k: float(np.mean([s["regime"]["values"][k] for s in per_seed])) for k in regime_lib.TARGETS}
  )
  for name, entry in regime.items():
    entry["per_seed"] = [s["regime"]["values"][name] for s in per_seed]
  rows = report.aggregate_rows([s["rows"] for s in per_seed], [s["seed"] for s in per_seed])

  paths = {}
  if config.plots:
    paths = report.plot_all(config, first, workdir)
  record = provenance.record(config, seed=list(config.seeds), started=started)
  record["wall_time_s"] = round(time.time() - started, 3)
  record["peak_rss_mib"] = round(provenance.peak_rss_mib(), 1)
  payload = {
    "regime": regime,
    "tasks": tasks,
    "rows": rows,
    "orderings": report.literature_orderings(rows),
    "seeds": [
      {k: v for k, v in s.items() if k not in ("learned_results", "recipes")} for s in per_seed
    ],
    "recipes": first["recipes"],
    "plots": paths,
    "provenance": record,
  }
  markdown = report.write(workdir, payload)
  print(markdown)
  return payload | {"markdown": markdown}
