"""synthvision data: determinism from the seed, balanced labels, no leakage across splits."""

import numpy as np
import pytest

from mergejax.benchmarks.synthvision import data, pretraining, render, tasks

_CFG = data.DataConfig(pretrain_size=24, train=40, val=20, test=20)


@pytest.fixture(scope="module")
def pool():
  return data.make_pool(_CFG)


@pytest.mark.parametrize("name", tasks.DEFAULT_TASKS)
def test_a_split_is_a_function_of_its_seed(name):
  a = data.make_split(_CFG, name, "val")
  b = data.make_split(_CFG, name, "val")
  np.testing.assert_array_equal(a.x, b.x)
  np.testing.assert_array_equal(a.y, b.y)
  other = data.make_split(data.DataConfig(seed=1, val=20), name, "val")
  assert not np.array_equal(a.x, other.x)


def test_splits_have_their_own_seeds():
  # Changing one split's size leaves the other splits unchanged.
  a = data.make_split(_CFG, "shapes", "train")
  b = data.make_split(data.DataConfig(train=40, val=50, test=20), "shapes", "train")
  np.testing.assert_array_equal(a.x, b.x)
  seeds = {tuple(data.split_rng(0, "shapes", s).integers(0, 2**31, 4)) for s in data.SPLITS}
  assert len(seeds) == 3


def test_labels_are_balanced_and_in_range(pool):
  for name, task in pool.tasks.items():
    k = tasks.TASKS[name].num_classes
    for split in data.SPLITS:
      y = getattr(task, split).y
      counts = np.bincount(y, minlength=k)
      assert len(counts) == k, (name, split)
      assert counts.max() - counts.min() <= 1, (name, split, counts)


def test_no_image_is_in_two_splits(pool):
  for name, task in pool.tasks.items():
    keys = {
      s: {r.tobytes() for r in getattr(task, s).x.reshape(len(getattr(task, s)), -1)}
      for s in data.SPLITS
    }
    assert not keys["train"] & keys["val"], name
    assert not (keys["train"] | keys["val"]) & keys["test"], name


def test_drop_duplicates_removes_exactly_the_seen_images():
  x = np.arange(4 * 3, dtype=np.uint8).reshape(4, 3)
  split = data.Split(x=x, y=np.arange(4))
  kept, dropped = data.drop_duplicates(split, {x[1].tobytes(), x[3].tobytes()})
  assert dropped == 2
  np.testing.assert_array_equal(kept.y, [0, 2])


def test_handwritten_digit_sources_are_disjoint_across_splits():
  parts = {s: set(tasks.digits_partition(s).tolist()) for s in data.SPLITS}
  assert not parts["train"] & parts["val"] and not parts["train"] & parts["test"]
  assert not parts["val"] & parts["test"]
  assert sum(map(len, parts.values())) == len(render.handwritten_digits()[1])


def test_pretraining_labels_cover_their_ranges(pool):
  assert pool.pretrain_x.shape == (24, 16, 16, 3) and pool.pretrain_x.dtype == np.uint8
  assert set(pool.pretrain_y) == set(pretraining.ATTRIBUTES)
  for name, k in pretraining.ATTRIBUTES.items():
    y = pool.pretrain_y[name]
    assert y.min() >= pretraining.IGNORE and y.max() < k, name
    assert (y >= 0).any(), name  # Every attribute is defined for some scenes.
  # Always defined: what every scene has.
  for name in ("category", "colour", "background", "count"):
    assert (pool.pretrain_y[name] >= 0).all(), name


def test_pool_cache_round_trips(tmp_path):
  cfg = data.DataConfig(pretrain_size=8, train=10, val=10, test=10, tasks=("count", "relation"))
  made, hit = data.load_or_make_pool(cfg, tmp_path)
  loaded, hit2 = data.load_or_make_pool(cfg, tmp_path)
  assert not hit and hit2
  np.testing.assert_array_equal(made.pretrain_x, loaded.pretrain_x)
  for name in cfg.tasks:
    np.testing.assert_array_equal(made.tasks[name].test.x, loaded.tasks[name].test.x)
  assert [p.name for p in tmp_path.iterdir()] == [f"pool-{data.pool_key(cfg)}.npz"]


def test_warp_places_and_rotates_a_mask():
  mask = np.zeros((1, 8, 8), np.float32)
  mask[0, 1:3, 1:6] = 1.0  # An asymmetric bar in the upper left.
  idx, one = np.zeros(1, np.int64), np.ones(1)
  same = render.warp(mask, idx, scale=one, angle=0 * one, cx=0 * one, cy=0 * one, size=8)
  np.testing.assert_allclose(same[0], mask[0], atol=1e-5)
  # A quarter turn counter-clockwise on screen (y points down) is np.rot90.
  turned = render.warp(mask, idx, scale=one, angle=np.pi / 2 * one, cx=0 * one, cy=0 * one, size=8)
  np.testing.assert_allclose(turned[0], np.rot90(mask[0]), atol=1e-5)
  # Scaled to half size and moved right by half the canvas: the mask lands in the right half.
  small = render.warp(mask, idx, scale=0.5 * one, angle=0 * one, cx=0.5 * one, cy=0 * one, size=8)
  assert small[0][:, :4].sum() == 0 and small[0].sum() > 0
