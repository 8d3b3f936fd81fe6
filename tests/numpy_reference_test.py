"""mergejax.testing.numpy_reference agrees with the rules it restates (so the rules benchmark's
agreement column compares against something checked)."""

import jax
import numpy as np
import pytest

from mergejax import rules
from mergejax.testing import numpy_reference as ref

# Hyper-parameters of each comparison, and the settings the NumPy restatements implement where a
# rule's default is another (issue 10): Breadcrumbs per leaf with round() counts, EMR's paper
# rescaler, DARE-TIES without the trim.
_CASES = {
  "task_arithmetic": ({"scale": 0.3}, {}),
  "weight_average": ({}, {}),
  "ties": ({"density": 0.2, "scale": 1.0}, {}),
  "breadcrumbs": (
    {"density": 0.15, "gamma": 0.05, "scale": 0.2},
    {"scope": "leaf", "counting": "round"},
  ),
  "consensus": ({"tall_lambda": 0.4, "min_tasks": 2, "scale": 0.3}, {}),
  "emr": ({}, {"rescaler": "paper"}),
  "model_stock": ({}, {}),
  "magmax": ({"scale": 0.5}, {}),
  "tsv_m": ({"scale": 1.0}, {}),
  "iso_c": ({"scale": 0.7}, {}),
  "iso_cts": ({"scale": 0.7}, {}),
}


def _inputs(seed=0, experts=4):
  rng = np.random.default_rng(seed)
  shapes = {"a/kernel": (24, 16), "a/bias": (16,), "b/kernel": (16, 8)}
  base = {p: rng.standard_normal(s).astype(np.float32) for p, s in shapes.items()}
  return base, [
    {p: x + 0.1 * rng.standard_normal(x.shape).astype(np.float32) for p, x in base.items()}
    for _ in range(experts)
  ]


@pytest.mark.parametrize("rule", sorted(_CASES))
def test_deterministic_rules_match_their_reference(rule):
  hparams, jax_only = _CASES[rule]
  base, experts = _inputs()
  merged = rules.task_models(rules.merge(rule, base, experts, **hparams, **jax_only), base, 4)[0]
  expected = ref.NUMPY[rule](base, experts, **hparams)
  assert sorted(merged) == sorted(expected)
  # SVD-based rules: LAPACK and XLA's SVDs differ in float32 rounding (polar factors of
  # nearly rank-deficient concatenations amplify it); element-wise rules agree to rounding.
  atol = 1e-4 if rule in ("tsv_m", "iso_c", "iso_cts") else 1e-6
  for path, x in expected.items():
    np.testing.assert_allclose(np.asarray(merged[path]), x, rtol=1e-5, atol=atol, err_msg=path)


@pytest.mark.parametrize("rule, combine", [("dare", "sum"), ("dare_ties", "ties")])
def test_random_rules_match_by_statistics(rule, combine):
  base, experts = _inputs(experts=2)
  base = {"w": np.zeros((200, 100), np.float32)}
  experts = [
    {"w": np.random.default_rng(i).standard_normal((200, 100), np.float32)} for i in (1, 2)
  ]
  extra = {"trim_density": None} if rule == "dare_ties" else {}
  ours = rules.merge(rule, base, experts, key=jax.random.key(0), density=0.3, scale=1.0, **extra)[
    "w"
  ]
  theirs = ref.np_dare(base, experts, 0.3, 1.0, combine)["w"]
  kept_ours, kept_theirs = np.mean(np.asarray(ours) != 0), np.mean(theirs != 0)
  assert abs(kept_ours - kept_theirs) < 0.02
  assert abs(np.linalg.norm(ours) / np.linalg.norm(theirs) - 1) < 0.03


def test_a_wrong_rule_is_caught():
  # The comparison above can fail: TIES at another density does not match the reference.
  base, experts = _inputs()
  merged = rules.merge("ties", base, experts, density=0.3, scale=1.0)
  expected = ref.NUMPY["ties"](base, experts, density=0.2, scale=1.0)
  assert not np.allclose(np.asarray(merged["a/kernel"]), expected["a/kernel"], atol=1e-6)


def test_data_dependent_rules_match_their_reference():
  base, experts = _inputs()
  rng = np.random.default_rng(5)
  fisher = [{"fisher": {p: rng.random(x.shape).astype(np.float32) for p, x in base.items()}}]
  fisher = fisher + [
    {"fisher": {p: 3.0 * rng.random(x.shape).astype(np.float32) for p, x in base.items()}}
    for _ in range(3)
  ]
  a = {k: rng.standard_normal((k, 2 * k)).astype(np.float32) for k in (24, 16)}
  grams = [
    {"grams": {"a/kernel": a[24] @ a[24].T * (t + 1), "b/kernel": a[16] @ a[16].T + t}}
    for t in range(4)
  ]
  for rule, stats, hparams in (("fisher", fisher, {}), ("regmean", grams, {"alpha": 0.7})):
    merged = rules.merge(rule, base, experts, statistics=stats, **hparams)
    expected = ref.NUMPY_DATA[rule](base, experts, stats, **hparams)
    for path, x in expected.items():
      np.testing.assert_allclose(np.asarray(merged[path]), x, rtol=1e-4, atol=1e-6, err_msg=path)
