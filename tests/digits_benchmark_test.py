"""Smoke run of the digits stress test: all rows, results files, plots, selection on validation
only; the shared table helpers (selection, seeds summary)."""

import json

import jax.numpy as jnp
import numpy as np

from configs import digits as digits_config
from configs import learned as learned_configs
from mergejax.benchmarks.common import learned_table, merge_table, plots
from mergejax.benchmarks.digits import run as benchmark


def test_smoke_run(tmp_path):
  config = digits_config.get_config("smoke")
  config.cache_dir = str(tmp_path / "cache")
  out = benchmark.run_benchmark(config, tmp_path / "work")
  rows, tasks = out["rows"], out["tasks"]
  modes, rules, learned = config.zoo.modes, config.rules, config.learned.run
  assert config.learned.enabled and len(learned) == len(learned_configs.recipes())
  assert len(rows) == 2 + len(modes) * (1 + len(rules) + len(learned))
  methods = {r["method"] for r in rows}
  assert {"pre-trained", "multi-task (joint training)", "fine-tuned (individual)"} <= methods
  assert {merge_table.RULE_LABELS[r] for r in rules} <= methods
  for r in rows:
    assert len(r["test"]) == len(tasks)
    assert all(0.0 <= a <= 1.0 for a in r["test"])
    assert np.isclose(r["avg"], np.mean(r["test"]))
    assert np.isfinite(r["norm"])
  # Learned rows: one per method and mode; exactly the recipes that adapt on test inputs are
  # transductive, and their label carries the mark.
  transductive = {
    "adamerging_taskwise",
    "adamerging",
    "adamerging_plus",
    "atlas_unsupervised",
    "dv_basi_unsupervised",
  }
  for name in learned:
    label = config.learned.methods[name].label  # The recipe names its row.
    expected = name in transductive
    assert (config.learned.methods[name].adapt_split == "test") == expected, name
    if expected:
      label += learned_table.TRANSDUCTIVE_MARK
    matching = [r for r in rows if r["method"] == label]
    assert len(matching) == len(modes), label
    assert all(r["transductive"] is expected for r in matching), label
    assert all(np.isfinite(r["val"]).all() for r in matching), label
  assert sum(r["transductive"] for r in rows) == len(transductive) * len(modes)
  assert learned_table.TRANSDUCTIVE_FOOTNOTE in (tmp_path / "work" / "results.md").read_text()
  individual = [r for r in rows if r["method"] == "fine-tuned (individual)"]
  assert all(np.isclose(r["norm"], 1.0) for r in individual)
  # Selected λ comes from the config's grid.
  ta = next(r for r in rows if r["method"] == "task arithmetic")
  assert ta["hparams"]["scale"] in config.grids.task_arithmetic.scale

  work = tmp_path / "work"
  for name in (
    "results.md",
    "results.json",
    "cosine.png",
    "sign_conflicts.png",
    "accuracy_vs_lambda.png",
    "learned_coefficients.png",
    "learned_curves_atlas.png",
    "dv_basi_trajectory.png",
  ):
    assert (work / name).stat().st_size > 0, name
  payload = json.loads((work / "results.json").read_text())
  assert payload["provenance"]["seed"] == config.seed
  assert payload["provenance"]["wall_time_s"] > 0
  assert not payload["zoo"]["cache_hit"]
  dv = payload["learned"]["dv_basi (standard)"]
  assert dv["selected"] == {"m*": dv["best_iteration"]} and len(dv["trajectory"]) >= 1

  # The second run loads the zoo from the cache; one learned method over two seeds.
  config.plots = False
  config.learned.run = ("adamerging_taskwise",)
  config.learned.seeds = (0, 1)
  again = benchmark.run_benchmark(config, tmp_path / "work2")
  assert again["zoo"]["cache_hit"]
  num_data_free = 2 + len(modes) * (1 + len(rules))
  assert [r["test"] for r in again["rows"][:num_data_free]] == [
    r["test"] for r in rows[:num_data_free]
  ]
  (two_seeds,) = again["rows"][num_data_free:]
  assert two_seeds["seeds"] == [config.seed, config.seed + 1] and two_seeds["norm_std"] >= 0
  np.testing.assert_allclose(np.mean(two_seeds["test_runs"], axis=0), two_seeds["test"])
  first = next(r for r in rows if r["method"] == two_seeds["method"])
  assert two_seeds["test_runs"][0] == first["test"]  # Seed 0 again: deterministic.
  assert "norm ± " in (tmp_path / "work2" / "results.md").read_text()

  # The switch turns learned methods off.
  config.learned.enabled = False
  config.rules = ("task_arithmetic",)
  off = benchmark.run_benchmark(config, tmp_path / "work3")
  assert not any(r["transductive"] for r in off["rows"])
  assert len(off["rows"]) == 2 + len(modes) * 2


def test_selection_uses_only_the_score_and_prefers_the_first_tie():
  calls = []

  def score(hp):
    calls.append(dict(hp))
    return np.array([1.0 - abs(hp["scale"] - 0.4), 0.5 if hp["density"] == 0.2 else 0.4])

  best, best_score, trace = merge_table.select_on_validation(
    score, {"density": (0.1, 0.2), "scale": (0.2, 0.4, 0.6)}
  )
  assert best == {"density": 0.2, "scale": 0.4}
  assert np.isclose(best_score, 0.75)
  assert len(trace) == len(calls) == 6
  tie, _, _ = merge_table.select_on_validation(lambda hp: np.ones(2), {"scale": (0.1, 0.2)})
  assert tie == {"scale": 0.1}
  assert merge_table.select_on_validation(lambda hp: np.ones(1), None)[0] == {}


def test_task_vector_statistics():
  a = {"w": jnp.array([1.0, -1.0, 0.0, 2.0])}
  b = {"w": jnp.array([1.0, 1.0, 0.0, -2.0])}
  c = {"w": jnp.zeros(4)}
  cos = plots.cosine_matrix([a, b, c])
  np.testing.assert_allclose(cos[0, 0], 1.0)
  np.testing.assert_allclose(cos[0, 1], (1 - 1 - 4) / 6.0)
  assert cos[0, 2] == 0.0 and cos[2, 2] == 0.0
  # Entries 1 and 3 have opposite signs; entry 0 agrees; entry 2 is zero everywhere.
  assert plots.sign_conflict_rates([a, b, c]) == {"w": 0.5}


def test_seeds_markdown_reports_mean_and_std():
  def payload(seed, norm):
    row = {"method": "m †", "fine_tuning": "standard", "avg": norm / 2, "norm": norm}
    return {"provenance": {"seed": seed}, "rows": [dict(row, transductive=True)]}

  text = benchmark.seeds_markdown([payload(0, 0.5), payload(1, 0.7)])
  assert "| m † | standard | 30.0 ± 5.0 | 60.0 ± 10.0 | 2 |" in text
  assert learned_table.TRANSDUCTIVE_FOOTNOTE in text
