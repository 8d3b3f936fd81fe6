"""The synthvision report: rows aggregated over seeds, the literature's orderings checked against
them, plots, and results.md (regime checks first) / results.json."""

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mergejax.benchmarks.common import evaluate, learned_table, plots, regime_plots
from mergejax.benchmarks.common import regime as regime_lib

# The orderings of CLIP ViT-B/32's 8-task table (METHODS.md; TSV-M, ISO-C/CTS from their papers):
# (lower row, higher row, the published normalized or absolute figures as text).
LITERATURE_ORDERINGS = (
  ("pre-trained (zero-shot)", "weight averaging", "48.0 < 65.8"),
  ("weight averaging", "task arithmetic", "65.8 < 70.1"),
  ("task arithmetic", "TIES", "70.1 < 72.4"),
  ("AdaMerging task-wise †", "AdaMerging layer-wise †", "71.1 < 80.1"),
  ("TIES", "AdaMerging layer-wise †", "72.4 < 80.1"),
  ("AdaMerging layer-wise †", "AdaMerging++ layer-wise †", "80.1 < 81.1"),
  ("AdaMerging layer-wise †", "aTLAS (supervised)", "80.1 < 85.0"),
  ("aTLAS (supervised)", "DV-BASI (supervised)", "85.0 < 85.9"),
  ("TIES", "TSV-M", "TSV-M and ISO beat TIES by a wide margin"),
  ("TIES", "ISO-C", ""),
  ("ISO-C", "ISO-CTS", "ISO-CTS ≥ ISO-C"),
  ("DV-BASI (supervised)", "EMR (task id)", "85.9 < 88.7"),
  ("EMR (task id)", "fine-tuned (individual)", "88.7 < 90.5"),
)


def aggregate_rows(
  rows_per_seed: Sequence[Sequence[Mapping[str, Any]]], seeds: Sequence[int]
) -> list[dict[str, Any]]:
  """Mean ± std over seeds of each (method, experts) row, in the first seed's order.

  Args:
    rows_per_seed: one list of `evaluate.result_row` dicts per seed.
    seeds: the seeds, in the same order.

  Returns:
    Rows with "test" / "val" (per-task means), "avg" / "norm" (means), "avg_std" / "norm_std"
    (population std over seeds), "runs" ([{seed, avg, norm, hparams}]) and "hparams" (the common
    selection, or {name: [per seed]} where the seeds chose differently).
  """
  groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
  for rows in rows_per_seed:
    for r in rows:
      groups.setdefault((r["method"], r["fine_tuning"]), []).append(r)
  out = []
  for (method, fine_tuning), group in groups.items():
    if len(group) != len(seeds):
      raise ValueError(f"Row {method!r} ({fine_tuning}) is missing from some seeds.")
    hps = [dict(r["hparams"]) for r in group]
    hparams = hps[0] if all(h == hps[0] for h in hps) else _per_seed(hps)
    row = {
      "method": method,
      "fine_tuning": fine_tuning,
      "hparams": hparams,
      "test": np.mean([r["test"] for r in group], axis=0).tolist(),
      "avg": float(np.mean([r["avg"] for r in group])),
      "norm": float(np.mean([r["norm"] for r in group])),
      "avg_std": float(np.std([r["avg"] for r in group])),
      "norm_std": float(np.std([r["norm"] for r in group])),
      "transductive": bool(group[0].get("transductive", False)),
      "runs": [
        {"seed": s, "avg": r["avg"], "norm": r["norm"], "hparams": r["hparams"]}
        for s, r in zip(seeds, group, strict=True)
      ],
    }
    if all("val" in r for r in group):
      row["val"] = np.mean([r["val"] for r in group], axis=0).tolist()
    out.append(row)
  return out


def _per_seed(hps: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
  names = list(dict.fromkeys(k for h in hps for k in h))
  return {k: [h.get(k) for h in hps] for k in names}


def literature_orderings(rows: Sequence[Mapping[str, Any]], mode: str = "standard") -> list[dict]:
  """Checks each of `LITERATURE_ORDERINGS` on `mode`'s rows (normalized test accuracy).

  A pair holds when the higher row's mean exceeds the lower row's; it is "within noise" when
  the gap is below the larger of the two standard deviations over seeds.

  Args:
    rows: aggregated rows (`aggregate_rows`).
    mode: whose experts' rows to compare (reference rows have fine_tuning "-").

  Returns:
    [{"lower", "higher", "lower_norm", "higher_norm", "gap", "holds", "within_noise",
      "published"}] for the pairs whose rows both exist.
  """
  by_method = {r["method"]: r for r in rows if r["fine_tuning"] in (mode, "-")}
  out = []
  for lower, higher, published in LITERATURE_ORDERINGS:
    if lower not in by_method or higher not in by_method:
      continue
    lo, hi = by_method[lower], by_method[higher]
    gap = hi["norm"] - lo["norm"]
    noise = max(lo.get("norm_std", 0.0), hi.get("norm_std", 0.0))
    out.append(
      {
        "lower": lower,
        "higher": higher,
        "lower_norm": lo["norm"],
        "higher_norm": hi["norm"],
        "gap": gap,
        "holds": bool(gap > 0),
        "within_noise": bool(abs(gap) <= noise),
        "published": published,
      }
    )
  return out


def plot_all(config, seed_result: Mapping[str, Any], workdir: Path) -> dict[str, str]:
  """The plots of one seed's run: cosines, sign conflicts, λ curves, learned, disentanglement."""
  mode = config.regime.mode
  paths = {
    "cosine": plots.plot_cosine(
      np.asarray(seed_result["cosine"][mode]),
      list(config.data.tasks),
      workdir / "cosine.png",
      title=f"Cosine similarity of task vectors ({mode}, seed {seed_result['seed']})",
    ),
    "sign_conflicts": plots.plot_sign_conflicts(
      seed_result["sign_conflicts"], workdir / "sign_conflicts.png"
    ),
  }
  if seed_result["curves"]:
    paths["accuracy_vs_scale"] = plots.plot_accuracy_vs_scale(
      seed_result["curves"], workdir / "accuracy_vs_lambda.png"
    )
  dmap = seed_result["regime"]["details"]["disentanglement_map"]
  paths["disentanglement_map"] = regime_plots.plot_disentanglement_map(
    dmap["xi"], dmap["coeffs"], dmap["pair"], workdir / "disentanglement_map.png"
  )
  if seed_result["learned_results"]:
    paths.update(
      learned_table.plot_learned(
        config.learned, seed_result["learned_results"], config.data.tasks, workdir
      )
    )
  return {k: str(v) for k, v in paths.items()}


def _pm(mean: float, std: float) -> str:
  return f"{100 * mean:.1f} ± {100 * std:.1f}"


def table_markdown(rows: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> str:
  """Method, experts, selection, per-task test means, avg ± std and norm ± std (%)."""
  header = ["method", "experts", "selected on val", *tasks, "avg", "norm"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in rows:
    cells = [r["method"], r["fine_tuning"], evaluate.format_hparams(r["hparams"])]
    cells += [f"{100 * a:.1f}" for a in r["test"]]
    cells += [_pm(r["avg"], r["avg_std"]), _pm(r["norm"], r["norm_std"])]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def orderings_markdown(orderings: Sequence[Mapping[str, Any]]) -> str:
  """The literature's orderings as a table: both rows' normalized accuracy and whether it holds."""
  lines = [
    "| ordering (CLIP ViT-B/32) | published | here (norm %) | holds |",
    "|---|---|---|---|",
  ]
  for o in orderings:
    verdict = "yes" if o["holds"] else "**no**"
    if o["within_noise"]:
      verdict += " (within seed noise)"
    lines.append(
      f"| {o['lower']} < {o['higher']} | {o['published'] or '-'} | "
      f"{100 * o['lower_norm']:.1f} vs {100 * o['higher_norm']:.1f} | {verdict} |"
    )
  return "\n".join(lines)


def write(workdir: Path, payload: Mapping[str, Any]) -> str:
  """Writes results.json and results.md (regime first); returns the Markdown."""
  prov = payload["provenance"]
  seeds = [s["seed"] for s in payload["seeds"]]
  versions = ", ".join(f"{k} {v}" for k, v in prov.get("versions", {}).items())
  md = [
    "# mergejax benchmark: synthvision",
    "",
    f"## Regime checks (mean over seeds {seeds}; per seed in results.json)",
    "",
    regime_lib.regime_markdown(payload["regime"]),
    "",
    f"## Test accuracy (%), mean ± std over seeds {seeds}",
    "",
    "Hyper-parameters were selected on validation (mean normalized accuracy); test is only "
    "reported. avg = mean accuracy over tasks, norm = mean of merged / expert accuracy.",
    "",
    table_markdown(payload["rows"], payload["tasks"]),
    "",
  ]
  if payload["recipes"]:
    md += [learned_table.learned_notes(payload["recipes"], []), ""]
  md += [
    "## The literature's orderings, here",
    "",
    orderings_markdown(payload["orderings"]),
    "",
    f"seeds {seeds}, wall time {prov.get('wall_time_s')} s, peak RSS {prov.get('peak_rss_mib')} "
    f"MiB, {versions}",
    "",
  ]
  text = "\n".join(md)
  (workdir / "results.md").write_text(text)
  (workdir / "results.json").write_text(json.dumps(payload, indent=2, default=_to_json))
  return text


def _to_json(x: Any) -> Any:
  if isinstance(x, np.ndarray | jax.Array):
    return np.asarray(x).tolist()
  if isinstance(x, np.generic):
    return x.item()
  return str(x)
