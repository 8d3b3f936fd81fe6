"""Zoo cache: the key follows the config; a miss builds and stores, a hit loads the same params."""

import chex
import jax
import numpy as np

from configs import digits as digits_config
from mergejax.benchmarks.digits import zoo as zoo_lib


def _zoo_config(**overrides):
  config = digits_config.get_config("smoke")
  config.zoo.tasks = ("rot90", "invert")
  config.zoo.modes = ("standard",)
  config.zoo.pretrain.steps = config.zoo.finetune.steps = config.zoo.multitask_steps = 4
  config.zoo.pretrain.warmup_steps = config.zoo.finetune.warmup_steps = 1
  config.zoo.pretrain.chunk = config.zoo.finetune.chunk = 4
  for k, v in overrides.items():
    config.zoo[k] = v
  return config.zoo


def test_key_depends_on_config_and_seed():
  a, b = _zoo_config(), _zoo_config()
  assert zoo_lib.zoo_key(a, 0) == zoo_lib.zoo_key(b, 0)
  assert zoo_lib.zoo_key(a, 0) != zoo_lib.zoo_key(a, 1)
  assert zoo_lib.zoo_key(a, 0) != zoo_lib.zoo_key(_zoo_config(multitask_steps=5), 0)


def test_miss_builds_then_hit_loads(tmp_path):
  config = _zoo_config()
  first = zoo_lib.load_or_build(config, 0, tmp_path, progress=False)
  assert not first.cache_hit
  assert (tmp_path / first.key / "zoo.json").exists()
  assert first.tasks == ("rot90", "invert")
  assert set(first.experts) == {"standard"} and len(first.experts["standard"]) == 2
  assert first.meta["build_seconds"] > 0

  second = zoo_lib.load_or_build(config, 0, tmp_path, progress=False)
  assert second.cache_hit and second.key == first.key
  chex.assert_trees_all_close(second.pretrained, first.pretrained)
  chex.assert_trees_all_close(second.experts, first.experts)
  chex.assert_trees_all_close(second.multitask, first.multitask)

  # A changed config is a miss under a new key; the old entry stays.
  changed = zoo_lib.load_or_build(_zoo_config(multitask_steps=8), 0, tmp_path, progress=False)
  assert not changed.cache_hit and changed.key != first.key
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.key, changed.key])
  # Same seed and pre-training config: the pre-trained model is rebuilt identically.
  chex.assert_trees_all_close(changed.pretrained, first.pretrained)


def test_experts_have_the_backbone_structure_and_moved(tmp_path):
  zoo = zoo_lib.load_or_build(_zoo_config(), 0, tmp_path, progress=False)
  base = zoo.pretrained["backbone"]
  for expert in zoo.experts["standard"]:
    chex.assert_trees_all_equal_shapes_and_dtypes(expert, base)
    moved = [
      np.abs(np.asarray(e) - np.asarray(b)).max()
      for e, b in zip(jax.tree.leaves(expert), jax.tree.leaves(base), strict=True)
    ]
    assert max(moved) > 0
