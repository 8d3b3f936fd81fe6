"""Evaluation for the built-in benchmark: accuracy, normalized accuracy, results tables.

Metrics follow the standard merging benchmark (METHODS.md): per-task accuracy, their mean
("average absolute accuracy") and the mean of merged / fine-tuned accuracy per task ("normalized
accuracy", where the reference is each task's own expert on the same split).
"""

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mergejax import losses
from mergejax.tree import Params


def make_accuracy_fn(
  apply: Callable[[Params, Params, jax.Array], jax.Array], head: Params
) -> Callable[[Params, jax.Array, jax.Array], jax.Array]:
  """Returns a jitted `accuracy(backbone, x [T, n, ...], y [T, n]) -> [T]` for a frozen head.

  All tasks are scored in one call, and the function compiles once per input shape, so sweeping
  a merge's λ re-runs it without recompiling.

  Args:
    apply: `apply(backbone, head, x) -> logits` (e.g. `finetune.make_apply(model, ...)`).
    head: the frozen classification head.

  Returns:
    The jitted accuracy function (fraction correct per task, float32).
  """

  @jax.jit
  def accuracy(backbone, x, y):
    t, n = y.shape
    logits = apply(backbone, head, x.reshape(t * n, *x.shape[2:]))
    return jax.vmap(losses.accuracy)(logits.reshape(t, n, -1), y)

  return accuracy


def normalized_accuracy(accuracy: Sequence[float], reference: Sequence[float]) -> np.ndarray:
  """Returns accuracy / reference per task (the reference is each task's own expert).

  Args:
    accuracy: per-task accuracies of the evaluated model.
    reference: per-task accuracies of the fine-tuned experts on the same split.

  Returns:
    float64 array of ratios (0 where the reference is 0).
  """
  acc = np.asarray(accuracy, np.float64)
  ref = np.asarray(reference, np.float64)
  if acc.shape != ref.shape:
    raise ValueError(f"Shapes differ: accuracy {acc.shape}, reference {ref.shape}.")
  return np.divide(acc, ref, out=np.zeros_like(acc), where=ref > 0)


def summarize(accuracy: Sequence[float], reference: Sequence[float]) -> dict[str, float]:
  """Returns {"avg": mean accuracy, "norm": mean normalized accuracy}.

  Args:
    accuracy: per-task accuracies.
    reference: per-task expert accuracies on the same split.

  Returns:
    Average absolute accuracy and average normalized accuracy.
  """
  acc = np.asarray(accuracy, np.float64)
  return {"avg": float(acc.mean()), "norm": float(normalized_accuracy(acc, reference).mean())}


def result_row(
  method: str,
  fine_tuning: str,
  hparams: Mapping[str, Any],
  test: Sequence[float],
  reference: Sequence[float],
  val: Sequence[float] | None = None,
  transductive: bool = False,
) -> dict[str, Any]:
  """One row of a results table: test accuracies, their summary, and what was selected.

  Args:
    method: the row's name.
    fine_tuning: how the experts were fine-tuned ("-" for reference rows).
    hparams: what was selected on validation (printed in the "selected on val" column).
    test: per-task test accuracies.
    reference: per-task expert test accuracies (for normalized accuracy).
    val: per-task validation accuracies, if any.
    transductive: whether the method adapted on unlabeled test inputs.

  Returns:
    {"method", "fine_tuning", "hparams", "test", "avg", "norm", "transductive"[, "val"]}.
  """
  row = {
    "method": method,
    "fine_tuning": fine_tuning,
    "hparams": dict(hparams),
    "test": [float(a) for a in test],
    **summarize(test, reference),
    "transductive": transductive,
  }
  if val is not None:
    row["val"] = [float(a) for a in val]
  return row


def format_hparams(hparams: Mapping[str, Any]) -> str:
  """ "name=value, ..." for a table cell ("-" when empty); floats in %g, lists per seed."""

  def fmt(v):
    if isinstance(v, list | tuple):
      return "/".join(fmt(x) for x in v)
    return f"{v:g}" if isinstance(v, float) else str(v)

  return ", ".join(f"{k}={fmt(v)}" for k, v in hparams.items()) or "-"


def results_markdown(rows: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> str:
  """Renders result rows as a Markdown table (accuracies in %).

  Args:
    rows: dicts with "method", "fine_tuning", "hparams" (dict), "test" (per-task list),
      "avg" and "norm" (test averages).
    tasks: task names, in the order of each row's "test" list.

  Returns:
    The Markdown table.
  """
  header = ["method", "experts", "selected on val", *tasks, "avg", "norm"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in rows:
    cells = [r["method"], r.get("fine_tuning", "-"), format_hparams(r.get("hparams", {}))]
    cells += [f"{100 * a:.1f}" for a in r["test"]]
    cells += [f"{100 * r['avg']:.1f}", f"{100 * r['norm']:.1f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_results(
  workdir: str | Path,
  rows: Sequence[Mapping[str, Any]],
  tasks: Sequence[str],
  provenance: Mapping[str, Any],
  *,
  extra: Mapping[str, Any] | None = None,
  notes_markdown: str = "",
  stem: str = "results",
) -> tuple[Path, Path]:
  """Writes `<stem>.md` (table + provenance summary) and `<stem>.json` (everything).

  Args:
    workdir: output directory (created).
    rows: result rows (see `results_markdown`).
    tasks: task names.
    provenance: record from `mergejax.provenance.record` (config, seed, versions, time, memory).
    extra: more JSON-serializable results (curves, matrices, timings).
    notes_markdown: more Markdown appended after the table (e.g. the expert x task matrix).
    stem: file name stem.

  Returns:
    (Markdown path, JSON path).
  """
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  versions = provenance.get("versions", {})
  md = [
    "# mergejax digits benchmark",
    "",
    "Test accuracy (%) per task; avg = mean accuracy, norm = mean of merged / expert accuracy.",
    "Hyper-parameters were selected on validation (mean normalized accuracy); test is only "
    "reported.",
    "",
    results_markdown(rows, tasks),
    "",
    notes_markdown,
    "",
    f"seed {provenance.get('seed')}, wall time {provenance.get('wall_time_s')} s, peak RSS "
    f"{provenance.get('peak_rss_mib')} MiB, " + ", ".join(f"{k} {v}" for k, v in versions.items()),
    "",
  ]
  md_path, json_path = workdir / f"{stem}.md", workdir / f"{stem}.json"
  md_path.write_text("\n".join(md))
  payload = {"tasks": list(tasks), "rows": list(rows), "provenance": dict(provenance)}
  payload.update(extra or {})
  json_path.write_text(json.dumps(payload, indent=2, default=_to_json))
  return md_path, json_path


def matrix_markdown(matrix: np.ndarray, tasks: Sequence[str], *, title: str) -> str:
  """Renders an [expert, task] accuracy matrix (in %) as a Markdown table.

  Args:
    matrix: matrix[i, j] = accuracy of task i's expert on task j.
    tasks: task names.
    title: a line printed above the table.

  Returns:
    The Markdown text.
  """
  lines = [title, "", "| expert \\ task | " + " | ".join(tasks) + " |"]
  lines.append("|" + "---|" * (len(tasks) + 1))
  for name, row in zip(tasks, np.asarray(matrix), strict=True):
    lines.append(f"| {name} | " + " | ".join(f"{100 * a:.1f}" for a in row) + " |")
  return "\n".join(lines)


def _to_json(x: Any) -> Any:
  if isinstance(x, np.ndarray | jax.Array):
    return np.asarray(x).tolist()
  if isinstance(x, np.generic):
    return x.item()
  return str(x)
