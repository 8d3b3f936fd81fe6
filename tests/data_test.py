"""Digits tasks: split sizes, disjoint splits, determinism, transformations."""

import numpy as np
import pytest

from mergejax.benchmarks.digits import data as digits


def test_split_sizes_partition_all_images():
  idx = digits.split_indices(1797, val_fraction=0.15, test_fraction=0.25, seed=0)
  assert len(idx["test"]) == round(0.25 * 1797)
  assert len(idx["val"]) == round(0.15 * 1797)
  assert sum(len(v) for v in idx.values()) == 1797
  assert np.array_equal(np.sort(np.concatenate(list(idx.values()))), np.arange(1797))


def test_splits_do_not_overlap():
  idx = digits.split_indices(1797, val_fraction=0.15, test_fraction=0.25, seed=3)
  assert not set(idx["train"]) & set(idx["val"])
  assert not set(idx["train"]) & set(idx["test"])
  assert not set(idx["val"]) & set(idx["test"])


def test_split_is_deterministic_and_seeded():
  a = digits.split_indices(100, val_fraction=0.2, test_fraction=0.2, seed=0)
  b = digits.split_indices(100, val_fraction=0.2, test_fraction=0.2, seed=0)
  c = digits.split_indices(100, val_fraction=0.2, test_fraction=0.2, seed=1)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  assert not np.array_equal(a["test"], c["test"])


@pytest.mark.parametrize("val,test", [(0.0, 0.2), (0.5, 0.5), (0.2, -0.1)])
def test_bad_fractions_raise(val, test):
  with pytest.raises(ValueError):
    digits.split_indices(100, val_fraction=val, test_fraction=test, seed=0)


def test_tasks_share_images_and_labels_across_transforms():
  tasks = digits.make_tasks(("identity", "rot90", "invert", "permute"), seed=0)
  ident = tasks["identity"]
  for name, task in tasks.items():
    for split in ("train", "val", "test"):
      s, ref = getattr(task, split), getattr(ident, split)
      assert s.x.shape == ref.x.shape and s.x.dtype == np.float32, name
      np.testing.assert_array_equal(s.y, ref.y)
  # Same images seen through the transformation (no test image leaks into any train split).
  np.testing.assert_array_equal(tasks["rot90"].test.x, np.rot90(ident.test.x, 1, axes=(1, 2)))
  np.testing.assert_allclose(tasks["invert"].val.x, 1.0 - ident.val.x)
  # A permutation moves pixels but keeps each image's multiset of values.
  np.testing.assert_array_equal(
    np.sort(tasks["permute"].train.x.reshape(-1, 64), axis=1),
    np.sort(ident.train.x.reshape(-1, 64), axis=1),
  )
  assert not np.array_equal(tasks["permute"].train.x, ident.train.x)


def test_make_tasks_is_deterministic():
  a = digits.make_tasks(("permute",), seed=5)["permute"]
  b = digits.make_tasks(("permute",), seed=5)["permute"]
  np.testing.assert_array_equal(a.train.x, b.train.x)
  np.testing.assert_array_equal(a.test.y, b.test.y)


def test_default_tasks_are_distinct_and_images_in_unit_range():
  tasks = digits.make_tasks(digits.DEFAULT_TASKS)
  assert len(tasks) >= 8
  xs = [t.val.x for t in tasks.values()]
  for i in range(len(xs)):
    assert 0.0 <= xs[i].min() and xs[i].max() <= 1.0
    for j in range(i):
      assert not np.array_equal(xs[i], xs[j]), (i, j)


def test_unknown_task_raises():
  with pytest.raises(ValueError, match="Unknown task"):
    digits.make_tasks(("rot45",))
