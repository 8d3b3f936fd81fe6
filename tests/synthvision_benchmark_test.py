"""The main job on the smoke config: regime first, rows over seeds, selection on validation only,
plots; and the report's aggregation and orderings on hand-made rows."""

import json

import jax
import numpy as np
import pytest

from configs import benchmark as benchmark_config
from mergejax.benchmarks.common import learned_table, regime
from mergejax.benchmarks.synthvision import report, run


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles():
  # Compilation dominates the smoke run on CPU; XLA's optimizations buy nothing at its sizes.
  saved = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", saved)


def test_smoke_run_over_two_seeds(tmp_path):
  config = benchmark_config.get_config("smoke")
  config.cache_dir = str(tmp_path / "cache")
  config.rules = ("task_arithmetic", "emr")  # A plain and a task-specific rule.
  config.learned.run = ("adamerging", "atlas")  # A transductive and an inductive recipe.
  out = run.run_benchmark(config, tmp_path / "work")
  saved = json.loads((tmp_path / "work" / "results.json").read_text())

  # The regime comes first, every statistic with its target, the mean over seeds and per seed.
  assert next(iter(saved)) == "regime"
  assert list(saved["regime"]) == list(regime.TARGETS)
  for name, entry in saved["regime"].items():
    assert len(entry["per_seed"]) == len(config.seeds)
    assert entry["value"] == pytest.approx(np.mean(entry["per_seed"]))
    assert entry["ok"] == regime.check(name, entry["value"])
  markdown = (tmp_path / "work" / "results.md").read_text()
  assert markdown.index("regime check") < markdown.index("| method |")

  # One row per method and mode, each the mean over seeds of its runs.
  methods = [r["method"] for r in saved["rows"]]
  expected = [
    "pre-trained (zero-shot)",
    "multi-task (joint training)",
    "fine-tuned (individual)",
    "task arithmetic",
    "EMR (task id)",
    "AdaMerging layer-wise" + learned_table.TRANSDUCTIVE_MARK,
    "aTLAS (supervised)",
  ]
  assert methods == expected
  for row in saved["rows"]:
    assert [run_["seed"] for run_ in row["runs"]] == list(config.seeds)
    assert row["norm"] == pytest.approx(np.mean([r["norm"] for r in row["runs"]]))
    assert row["norm_std"] == pytest.approx(np.std([r["norm"] for r in row["runs"]]))
    assert row["avg"] == pytest.approx(np.mean(row["test"]))
    assert row["transductive"] == row["method"].endswith(learned_table.TRANSDUCTIVE_MARK)
  experts = next(r for r in saved["rows"] if r["method"] == "fine-tuned (individual)")
  assert experts["norm"] == pytest.approx(1.0)
  # λ comes from the validation grid, per seed.
  ta = next(r for r in saved["rows"] if r["method"] == "task arithmetic")
  for r in ta["runs"]:
    assert r["hparams"]["scale"] in config.grids.task_arithmetic.scale
  assert out["seeds"][0]["zoo"]["key"] != out["seeds"][1]["zoo"]["key"]
  for name in ("cosine", "sign_conflicts", "accuracy_vs_scale", "disentanglement_map"):
    assert (tmp_path / "work" / f"{name.replace('_scale', '_lambda')}.png").stat().st_size > 0
  assert saved["provenance"]["seed"] == list(config.seeds)

  # A second run reuses every zoo of the cache and reproduces the data-free rows.
  config.learned.enabled = False
  config.plots = False
  again = run.run_benchmark(config, tmp_path / "work2")
  assert all(s["zoo"]["cache_hit"] for s in again["seeds"])
  assert [r["test"] for r in again["rows"]] == [r["test"] for r in saved["rows"][:5]]


def _row(method, norms, hparams=None, mode="standard"):
  return [
    {
      "method": method,
      "fine_tuning": mode,
      "hparams": (hparams or [{}] * len(norms))[i],
      "test": [n, n],
      "avg": n,
      "norm": n,
      "transductive": False,
    }
    for i, n in enumerate(norms)
  ]


def test_aggregate_rows_and_orderings():
  ta = _row("task arithmetic", [0.5, 0.7], [{"scale": 0.3}, {"scale": 0.4}])
  ties = _row("TIES", [0.8, 0.8], [{"scale": 1.0}, {"scale": 1.0}])
  rows = report.aggregate_rows([[ta[0], ties[0]], [ta[1], ties[1]]], seeds=[3, 4])
  assert [r["method"] for r in rows] == ["task arithmetic", "TIES"]
  assert rows[0]["norm"] == pytest.approx(0.6) and rows[0]["norm_std"] == pytest.approx(0.1)
  assert rows[0]["hparams"] == {"scale": [0.3, 0.4]} and rows[1]["hparams"] == {"scale": 1.0}
  assert [r["seed"] for r in rows[0]["runs"]] == [3, 4]
  (order,) = report.literature_orderings(rows)
  assert (order["lower"], order["higher"]) == ("task arithmetic", "TIES")
  assert order["holds"] and not order["within_noise"] and order["gap"] == pytest.approx(0.2)
  # A row missing from one seed is an error, not a silent mean over fewer runs.
  with pytest.raises(ValueError, match="missing from some seeds"):
    report.aggregate_rows([[ta[0], ties[0]], [ta[1]]], seeds=[0, 1])
