"""Regime statistics, each on a case with a known answer."""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from mergejax.benchmarks.common import regime


def test_zero_shot_normalized():
  assert regime.zero_shot_normalized([0.5, 0.3], [1.0, 0.6]) == pytest.approx(0.5)
  assert regime.zero_shot_normalized([0.5, 0.2], [0.0, 0.4]) == pytest.approx(0.25)


def test_relative_norm_is_the_median_over_leaves():
  base = {"a": jnp.ones(4), "b": 2 * jnp.ones(9), "c": -jnp.ones(1)}  # norms 2, 6, 1
  tau = {"a": 0.01 * jnp.ones(4), "b": jnp.zeros(9), "c": jnp.array([0.5])}  # ratios .01, 0, .5
  assert regime.relative_norms(base, tau) == pytest.approx({"a": 0.01, "b": 0.0, "c": 0.5})
  assert regime.task_vector_relative_norm(base, [tau]) == pytest.approx(0.01)
  # Mean over task vectors of each one's median.
  double = {k: 2 * v for k, v in tau.items()}
  assert regime.task_vector_relative_norm(base, [tau, double]) == pytest.approx(0.015)


def test_mean_abs_pairwise_cosine():
  e = lambda *v: {"w": jnp.array(v, jnp.float32)}  # noqa: E731
  assert regime.mean_abs_pairwise_cosine([e(1, 0), e(0, 3)]) == pytest.approx(0.0)
  assert regime.mean_abs_pairwise_cosine([e(1, 2), e(-2, -4)]) == pytest.approx(1.0)
  # Pairs: (1,0)·(1,1) = 1/√2, (1,0)·(0,-1) = 0, (1,1)·(0,-1) = -1/√2 -> mean |cos| = √2 / 3.
  value = regime.mean_abs_pairwise_cosine([e(1, 0), e(1, 1), e(0, -1)])
  assert value == pytest.approx(np.sqrt(2) / 3)


def test_gain_retained():
  out = regime.gain_retained([0.8, 0.5, 0.7], [0.5, 0.5, 0.7], [0.9, 0.9, 0.7])
  np.testing.assert_allclose(out, [0.75, 0.0, 1.0])  # The last task gained nothing.


def test_spearman_known_and_against_scipy():
  assert regime.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
  assert regime.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
  assert regime.spearman([1, 1, 1], [1, 2, 3]) == 0.0
  rng = np.random.default_rng(0)
  x, y = rng.integers(0, 5, 40), rng.normal(size=40)  # Ties in x.
  assert regime.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)


def test_sign_conflicts_hand_worked():
  vs = [
    {"w": jnp.array([1.0, 0.0, 2.0, -1.0])},
    {"w": jnp.array([1.0, -1.0, 0.0, 1.0])},
    {"w": jnp.array([0.0, 1.0, 0.0, 0.0])},
  ]
  # Entries with >= 2 non-zeros: 0 (agree), 1 (conflict), 3 (conflict); entry 2 has one.
  out = regime.sign_conflicts(vs)
  assert out["rate"] == pytest.approx(2 / 3)
  assert out["random_baseline"] == pytest.approx(0.5)  # m = 2 everywhere: 1 - 2^(1-2).
  assert out["overlap_fraction"] == pytest.approx(0.75)


def test_sign_conflicts_of_independent_dense_signs_match_the_baseline():
  rng = np.random.default_rng(0)
  vs = [{"w": jnp.asarray(rng.choice([-1.0, 1.0], 20_000))} for _ in range(8)]
  out = regime.sign_conflicts(vs)
  assert out["random_baseline"] == pytest.approx(1 - 2.0**-7)  # 99.2% for 8 dense vectors.
  assert out["rate"] == pytest.approx(out["random_baseline"], abs=0.003)


def _predict(entangled):
  # Task 0's label: is p0 (+ p1 if entangled) positive; task 1's label: is p1 positive.
  def predict(params, task):
    p = np.asarray(params["w"])
    score = (p[0] + p[1] if entangled else p[0]) if task == 0 else p[1]
    return np.array([score > 0])

  return predict


def test_disentanglement_map_is_zero_for_disjoint_vectors():
  base = {"w": jnp.array([1.0, 1.0])}
  pair = ({"w": jnp.array([-3.0, 0.0])}, {"w": jnp.array([0.0, -3.0])})
  xi = regime.disentanglement_map(_predict(False), base, pair, (0, 1), (0.0, 0.5, 1.0))
  np.testing.assert_array_equal(xi, np.zeros((3, 3)))


def test_disentanglement_map_counts_changed_predictions():
  base = {"w": jnp.array([1.0, 1.0])}
  pair = ({"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, -3.0])})
  xi = regime.disentanglement_map(_predict(True), base, pair, (0, 1), (0.0, 1.0))
  # (α1, α2) = (0, 1): task 0 alone p = (1, 1) -> True; joint (1, -2) -> False: 1 error.
  # (1, 1): alone (2, 1) -> True; joint (2, -2) -> score 0 -> False: 1 error. Task 1 never
  # changes (p1 is the same alone and joint). α2 = 0: the joint model is the task-0 model.
  np.testing.assert_array_equal(xi, [[0.0, 1.0], [0.0, 1.0]])


def test_checks_and_markdown():
  assert regime.check("experts_accuracy", 0.95) is True
  assert regime.check("task_vector_relative_norm", 0.06) is False
  assert regime.check("zero_shot_normalized", 0.5) is True
  assert regime.check("zero_shot_normalized", 0.8) is False
  assert regime.check("disentanglement_error", 0.3) is None
  obj = regime.regime_object({"experts_accuracy": 0.95, "sign_conflicts_after_trim": 0.6})
  assert list(obj) == ["experts_accuracy", "sign_conflicts_after_trim"]
  assert obj["experts_accuracy"] == {"value": 0.95, "target": "≥ 0.9", "ok": True}
  text = regime.regime_markdown(obj)
  assert "| experts_accuracy | 0.9500 | ≥ 0.9 | yes |" in text
