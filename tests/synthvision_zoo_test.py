"""synthvision smoke zoo: cache keys and hits, frozen padded heads, experts, the regime checks."""

import chex
import jax
import numpy as np
import pytest

from configs import benchmark as sv_config
from mergejax.benchmarks.common import regime
from mergejax.benchmarks.synthvision import regime as sv_regime
from mergejax.benchmarks.synthvision import zoo as zoo_lib


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles():
  # Compilation dominates the smoke zoo on CPU; XLA's optimizations buy nothing at its sizes.
  saved = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", saved)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  config = sv_config.get_config("smoke")
  config.cache_dir = str(tmp_path_factory.mktemp("cache"))
  return config, zoo_lib.load_or_build(config, 0, progress=False)


def test_keys_follow_what_determines_each_stage():
  a, b = sv_config.get_config("smoke"), sv_config.get_config("smoke")
  assert zoo_lib.zoo_keys(a, 0) == zoo_lib.zoo_keys(b, 0)
  b.zoo.finetune.learning_rate = 0.5
  # A new fine-tuning recipe keeps the pre-trained backbone's key.
  assert zoo_lib.zoo_keys(a, 0)[0] == zoo_lib.zoo_keys(b, 0)[0]
  assert zoo_lib.zoo_keys(a, 0)[1] != zoo_lib.zoo_keys(b, 0)[1]
  # So does another run seed: every seed shares one pre-trained backbone ...
  assert zoo_lib.zoo_keys(a, 0)[0] == zoo_lib.zoo_keys(a, 1)[0]
  assert zoo_lib.zoo_keys(a, 0)[1] != zoo_lib.zoo_keys(a, 1)[1]
  # ... unless its own seed changes.
  b.zoo.pretrain.seed = 1
  assert zoo_lib.zoo_keys(a, 0)[0] != zoo_lib.zoo_keys(b, 0)[0]


def test_second_load_is_a_cache_hit_with_equal_params(built):
  config, first = built
  assert not first.cache_hit
  second = zoo_lib.load_or_build(config, 0, progress=False)
  assert second.cache_hit and second.key == first.key
  chex.assert_trees_all_close(second.base, first.base)
  chex.assert_trees_all_close(second.experts, first.experts)
  chex.assert_trees_all_close(second.heads, first.heads)


def test_experts_moved_from_the_base_and_heads_are_padded(built):
  config, zoo = built
  assert zoo.tasks == tuple(config.data.tasks)
  rows = zoo_lib.num_head_rows(zoo.tasks)
  for t, (expert, head) in enumerate(zip(zoo.experts["standard"], zoo.heads, strict=True)):
    chex.assert_trees_all_equal_shapes_and_dtypes(expert, zoo.base)
    moved = max(
      float(np.abs(np.asarray(e) - np.asarray(b)).max())
      for e, b in zip(jax.tree.leaves(expert), jax.tree.leaves(zoo.base), strict=True)
    )
    assert moved > 0
    k = len(zoo_lib.tasks_lib.TASKS[zoo.tasks[t]].classes)
    assert head["prototypes"].shape[0] == rows
    assert np.all(np.asarray(head["logit_bias"])[k:] < -1e8)
    assert np.all(np.asarray(head["logit_bias"])[:k] == 0)


def test_apply_fn_and_evaluate(built):
  _, zoo = built
  x = zoo.data[zoo.tasks[1]].val.x[:5]
  logits = zoo.apply_fn("standard")(zoo.base, x, 1)
  assert logits.shape == (5, zoo_lib.num_head_rows(zoo.tasks))
  acc, ent = zoo.evaluate(zoo.base, "val")
  assert acc.shape == ent.shape == (len(zoo.tasks),)
  assert np.all((acc >= 0) & (acc <= 1)) and np.all(ent >= 0)
  # Task 1's accuracy from apply_fn agrees with the batched evaluation.
  xv, yv = zoo.split("val")
  direct = np.mean(np.argmax(zoo.apply_fn()(zoo.base, xv[1], 1), -1) == yv[1])
  assert direct == pytest.approx(acc[1])


def test_every_regime_statistic_is_measured(built):
  config, zoo = built
  refs = sv_regime.reference_accuracies(zoo, "standard")
  measured = sv_regime.measure_regime(zoo, config, refs)
  assert list(measured["values"]) == list(regime.TARGETS)
  assert all(np.isfinite(v) for v in measured["values"].values())
  details = measured["details"]
  assert len(details["trim20_gain_per_task"]) == len(zoo.tasks)
  np.testing.assert_allclose(
    np.mean(details["trim20_gain_per_task"]), measured["values"]["trim20_gain_retained"]
  )
  xi = np.asarray(details["disentanglement_map"]["xi"])
  assert xi.shape == (len(config.regime.map_coeffs),) * 2 and np.all((xi >= 0) & (xi <= 2))
