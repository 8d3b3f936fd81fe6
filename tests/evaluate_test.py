"""Evaluation math, the accuracy function and the results files."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax import provenance
from mergejax.benchmarks.common import evaluate
from mergejax.benchmarks.common.data import Split, stack_splits


def test_normalized_accuracy_and_summary():
  acc, ref = [0.5, 0.9, 0.0], [1.0, 0.9, 0.5]
  np.testing.assert_allclose(evaluate.normalized_accuracy(acc, ref), [0.5, 1.0, 0.0])
  s = evaluate.summarize(acc, ref)
  assert s["avg"] == pytest.approx(np.mean(acc))
  assert s["norm"] == pytest.approx(0.5)
  # A zero reference gives 0, not a division error.
  np.testing.assert_allclose(evaluate.normalized_accuracy([0.3], [0.0]), [0.0])
  with pytest.raises(ValueError, match="Shapes"):
    evaluate.normalized_accuracy([0.1, 0.2], [0.3])


def test_accuracy_fn_matches_numpy():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((4, 3)).astype(np.float32)
  apply = lambda backbone, head, x: x @ backbone["w"] + head
  x = rng.standard_normal((2, 10, 4)).astype(np.float32)
  y = rng.integers(0, 3, (2, 10)).astype(np.int32)
  head = jnp.zeros(3)
  got = evaluate.make_accuracy_fn(apply, head)({"w": jnp.asarray(w)}, x, y)
  want = ((x @ w).argmax(-1) == y).mean(axis=1)
  np.testing.assert_allclose(got, want)


def test_stack_splits_requires_equal_sizes():
  a = Split(x=np.zeros((3, 2)), y=np.zeros(3, np.int32))
  b = Split(x=np.ones((3, 2)), y=np.ones(3, np.int32))
  x, y = stack_splits([a, b])
  assert x.shape == (2, 3, 2) and y.shape == (2, 3)
  with pytest.raises(ValueError):
    stack_splits([a, Split(x=np.zeros((2, 2)), y=np.zeros(2, np.int32))])


def test_results_files(tmp_path):
  rows = [
    {
      "method": "pre-trained",
      "fine_tuning": "-",
      "hparams": {},
      "test": [0.25, 0.5],
      "avg": 0.375,
      "norm": 0.4,
    },
    {
      "method": "TIES",
      "fine_tuning": "standard",
      "hparams": {"density": 0.2, "scale": 1.0},
      "test": [0.9, 0.8],
      "avg": 0.85,
      "norm": 0.9,
    },
  ]
  record = provenance.record({"seed": 0}, seed=0, started=0.0)
  md_path, json_path = evaluate.write_results(
    tmp_path, rows, ["a", "b"], record, extra={"curve": np.arange(3)}
  )
  md = md_path.read_text()
  assert "| TIES | standard | density=0.2, scale=1 | 90.0 | 80.0 | 85.0 | 90.0 |" in md
  assert "| method | experts | selected on val | a | b | avg | norm |" in md
  payload = json.loads(json_path.read_text())
  assert payload["tasks"] == ["a", "b"] and payload["curve"] == [0, 1, 2]
  prov = payload["provenance"]
  assert {"config", "seed", "versions", "wall_time_s", "peak_rss_mib"} <= set(prov)
  assert {"jax", "flax", "optax", "numpy"} <= set(prov["versions"])
  assert prov["peak_rss_mib"] > 0
  jax.block_until_ready(jnp.zeros(1))


def test_matrix_markdown():
  md = evaluate.matrix_markdown(np.array([[0.9, 0.1], [0.2, 0.8]]), ["a", "b"], title="T")
  lines = md.splitlines()
  assert lines[0] == "T"
  assert lines[-2:] == ["| a | 90.0 | 10.0 |", "| b | 20.0 | 80.0 |"]
