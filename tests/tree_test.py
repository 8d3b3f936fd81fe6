"""Tree helpers: paths, flatten/unflatten, selection by pattern."""

import jax.numpy as jnp
import pytest

from mergejax import tree


def _params():
  return {"encoder": {"0": {"kernel": jnp.ones(2), "bias": jnp.ones(1)}}, "head": {"kernel": 1.0}}


def test_flatten_round_trip():
  flat = tree.flatten(_params())
  assert list(flat) == ["encoder/0/bias", "encoder/0/kernel", "head/kernel"]
  assert tree.unflatten(flat).keys() == _params().keys()
  assert tree.leaf_paths([{"a": 1}, 2]) == ["0/a", "1"]


def test_unflatten_conflict():
  with pytest.raises(ValueError, match="passes through leaf"):
    tree.unflatten({"a": 1, "a/b": 2})


def test_select_patterns():
  mask = tree.select(_params(), include=r"encoder/.*/kernel")
  assert tree.flatten(mask) == {
    "encoder/0/bias": False,
    "encoder/0/kernel": True,
    "head/kernel": False,
  }
  mask = tree.select(_params(), exclude=["head/.*", ".*bias"])
  assert [k for k, v in tree.flatten(mask).items() if v] == ["encoder/0/kernel"]
  with pytest.raises(ValueError, match="select no leaf"):
    tree.select(_params(), include="decoder")


def test_num_params():
  assert tree.num_params(_params()) == 4
