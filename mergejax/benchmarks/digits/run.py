"""The built-in offline benchmark: build or load the zoo, merge with every rule, report.

One story in phases: (1) data and zoo, (2) reference rows (pre-trained, experts, multi-task),
(3) for each fine-tuning mode and rule, select hyper-parameters on validation by mean normalized
accuracy and report test, (4) for each mode, learn merging coefficients (AdaMerging, aTLAS,
DV-BASI; `learned.py`), (5) write results.md / results.json with provenance, and plots.

Selection never looks at test: every grid point is scored on the validation splits only, and the
test split is evaluated once, for the chosen point. Learned methods whose recipe adapts Λ on
unlabeled test *inputs* (AdaMerging, DV-BASI unsupervised) are transductive: their rows say so
(`"transductive": true`, † in the table); they still never see a test label.
"""

import functools
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
import tqdm
from absl import logging

from mergejax import finetune, provenance, rules
from mergejax import task_vectors as tv_lib
from mergejax import tree as tree_lib
from mergejax.benchmarks.common import evaluate, learned_table, merge_table, plots
from mergejax.benchmarks.common.data import stack_splits
from mergejax.benchmarks.common.learned_table import TRANSDUCTIVE_FOOTNOTE
from mergejax.benchmarks.digits import learned as learned_lib
from mergejax.benchmarks.digits import zoo as zoo_lib

_row = evaluate.result_row


def run_benchmark(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Runs the benchmark described by `config` (configs/benchmark.py) and writes its results.

  Args:
    config: the benchmark config.
    workdir: output directory for results.md, results.json and the plots.

  Returns:
    The results: {"rows", "tasks", "markdown", "provenance", "zoo", "curves", "paths"}.
  """
  started = time.time()
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)

  # 1. Data and zoo (built once per config hash, then loaded from the cache).
  data = zoo_lib.load_data(config.zoo)
  zoo_start = time.time()
  zoo = zoo_lib.load_or_build(config.zoo, config.seed, config.cache_dir, data)
  zoo_seconds = time.time() - zoo_start
  logging.info("Zoo %s: %s in %.1fs.", zoo.key, "loaded" if zoo.cache_hit else "built", zoo_seconds)
  model = zoo_lib.build_model(config.zoo)
  tasks = zoo.tasks
  head, base = zoo.pretrained["head"], zoo.pretrained["backbone"]
  val = stack_splits([data[t].val for t in tasks])
  test = stack_splits([data[t].test for t in tasks])
  # One jitted accuracy function per forward pass; linearized experts (and their merges) are
  # evaluated with the Taylor model around the pre-trained backbone.
  acc_fns = {
    mode: evaluate.make_accuracy_fn(finetune.make_apply(model, mode=mode, base_backbone=base), head)
    for mode in {"standard", *config.zoo.modes}
  }

  def accuracy(backbone, split, mode="standard"):
    return np.asarray(acc_fns[mode](backbone, *split))

  splits = {"val": val, "test": test}

  # 2. Reference rows. expert_matrix[i, j]: expert i on task j; its diagonal is the reference of
  # normalized accuracy (per mode).
  expert_val, expert_test, matrices = {}, {}, {}
  for mode in config.zoo.modes:
    mat_val = np.stack([accuracy(e, val, mode) for e in zoo.experts[mode]])
    mat_test = np.stack([accuracy(e, test, mode) for e in zoo.experts[mode]])
    expert_val[mode], expert_test[mode] = np.diag(mat_val), np.diag(mat_test)
    matrices[mode] = mat_test
  ref_mode = config.zoo.modes[0]
  rows = [
    _row("pre-trained", "-", {}, accuracy(base, test), expert_test[ref_mode]),
    _row(
      "multi-task (joint training)", "-", {}, accuracy(zoo.multitask, test), expert_test[ref_mode]
    ),
  ]

  # 3. Merges: every rule, per fine-tuning mode, hyper-parameters chosen on validation.
  curves, selection, conflicts, cosines = {}, {}, {}, {}
  for mode in config.zoo.modes:
    experts = zoo.experts[mode]
    rows.append(
      _row(
        "fine-tuned (individual)", mode, {}, expert_test[mode], expert_test[mode], expert_val[mode]
      )
    )
    vectors = tv_lib.task_vectors(base, experts)
    cosines[mode] = plots.cosine_matrix(vectors)
    conflicts[mode] = plots.sign_conflict_rates(vectors)
    mode_accuracy = lambda b, name, mode=mode: accuracy(b, splits[name], mode)  # noqa: E731
    for rule in tqdm.tqdm(config.rules, desc=f"merging ({mode})", leave=False):
      rule_start = time.time()
      extra = rules.add_key(rule, {}, config.seed)
      grid = config.grids.get(rule)
      grid = grid.to_dict() if grid is not None else None
      row, curve, points = merge_table.rule_row(
        rule, mode, base, experts, mode_accuracy, expert_val[mode], expert_test[mode], grid, extra
      )
      rows.append(row)
      if curve is not None:
        curves[f"{rule} ({mode})"] = curve
      selection[f"{rule} ({mode})"] = {
        "grid_points": points,
        "seconds": round(time.time() - rule_start, 2),
      }

  # 4. Learned merging coefficients, per mode; selection on validation only.
  learned = {"results": {}, "recipes": {}}
  if config.learned.enabled:
    for mode in config.learned.modes or config.zoo.modes:
      mode_rows, mode_info = learned_lib.learned_rows(
        config,
        model,
        zoo,
        data,
        mode,
        functools.partial(accuracy, mode=mode),
        expert_val[mode],
        expert_test[mode],
      )
      rows.extend(mode_rows)
      selection.update(mode_info["timing"])
      learned["results"][mode] = mode_info["results"]
      learned["recipes"].update(mode_info["recipes"])

  # 5. Results with provenance, and plots.
  markdown = evaluate.results_markdown(rows, tasks)
  record = provenance.record(config, seed=config.seed, started=started)
  zoo_info = {
    "key": zoo.key,
    "cache_hit": zoo.cache_hit,
    "seconds": round(zoo_seconds, 2),
    "build": zoo.meta,
    "num_backbone_params": tree_lib.num_params(base),
  }
  paths = {}
  if config.plots:
    paths["cosine"] = str(
      plots.plot_cosine(
        cosines[ref_mode],
        tasks,
        workdir / "cosine.png",
        title=f"Cosine similarity of task vectors ({ref_mode})",
      )
    )
    paths["sign_conflicts"] = str(
      plots.plot_sign_conflicts(conflicts, workdir / "sign_conflicts.png")
    )
    if curves:
      paths["accuracy_vs_scale"] = str(
        plots.plot_accuracy_vs_scale(curves, workdir / "accuracy_vs_lambda.png")
      )
    if learned["results"]:
      paths.update(learned_table.plot_learned(config.learned, learned["results"], tasks, workdir))
  # Final figures, after the plots: wall time of the whole job and its peak memory.
  record["wall_time_s"] = round(time.time() - started, 3)
  record["peak_rss_mib"] = round(provenance.peak_rss_mib(), 1)
  extra = {
    "zoo": zoo_info,
    "expert_matrix_test": {m: v.tolist() for m, v in matrices.items()},
    "cosine": {m: v.tolist() for m, v in cosines.items()},
    "sign_conflicts": conflicts,
    "curves": curves,
    "selection": selection,
    "learned": learned_table.learned_summary(learned["results"]),
    "plots": paths,
  }
  notes = evaluate.matrix_markdown(
    matrices[ref_mode], tasks, title=f"Test accuracy (%) of each {ref_mode} expert on every task:"
  )
  if learned["recipes"]:
    notes = learned_table.learned_notes(learned["recipes"], rows) + "\n\n" + notes
  md_path, json_path = evaluate.write_results(
    workdir, rows, tasks, record, extra=extra, notes_markdown=notes
  )
  paths.update(markdown=str(md_path), json=str(json_path))
  print(markdown)
  if learned["recipes"]:
    print(TRANSDUCTIVE_FOOTNOTE)
  print(
    f"zoo {zoo.key} ({'cache hit' if zoo.cache_hit else 'built'}, {zoo_seconds:.1f}s); "
    f"total {record['wall_time_s']:.1f}s, peak RSS {record['peak_rss_mib']} MiB"
  )
  return {
    "rows": rows,
    "tasks": tasks,
    "markdown": markdown,
    "provenance": record,
    "zoo": zoo_info,
    "curves": curves,
    "paths": paths,
    "expert_matrix_test": matrices,
  }


def seeds_markdown(payloads: Sequence[Mapping[str, Any]]) -> str:
  """Mean ± std over runs (one results.json payload per seed) of each (method, experts) row.

  Args:
    payloads: parsed results.json files of runs that differ only in `config.seed` (the zoo:
      pre-training, fine-tuning, and the learned methods' batch order).

  Returns:
    A Markdown table: method, experts, transductive, avg and norm as mean ± std (%), runs.
  """
  groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
  for payload in payloads:
    for row in payload["rows"]:
      groups.setdefault((row["method"], row["fine_tuning"]), []).append(row)
  seeds = [p["provenance"]["seed"] for p in payloads]
  lines = [
    f"Test accuracy (%), mean ± std over seeds {seeds} (std: population, ddof=0).",
    "",
    "| method | experts | avg | norm | runs |",
    "|---|---|---|---|---|",
  ]
  for (method, fine_tuning), rows in groups.items():
    avg = 100 * np.array([r["avg"] for r in rows])
    norm = 100 * np.array([r["norm"] for r in rows])
    lines.append(
      f"| {method} | {fine_tuning} | {avg.mean():.1f} ± {avg.std():.1f} | "
      f"{norm.mean():.1f} ± {norm.std():.1f} | {len(rows)} |"
    )
  if any(r.get("transductive") for p in payloads for r in p["rows"]):
    lines += ["", TRANSDUCTIVE_FOOTNOTE]
  return "\n".join(lines)


def write_seeds_summary(out_dir: str | Path, workdirs: Sequence[str | Path]) -> Path:
  """Writes `out_dir/seeds.md` from the results.json of each run in `workdirs`; prints it.

  Args:
    out_dir: output directory.
    workdirs: one benchmark workdir per seed.

  Returns:
    The path of seeds.md.
  """
  payloads = [json.loads((Path(w) / "results.json").read_text()) for w in workdirs]
  text = seeds_markdown(payloads)
  path = Path(out_dir) / "seeds.md"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("# mergejax digits benchmark over seeds\n\n" + text + "\n")
  print(text)
  return path
