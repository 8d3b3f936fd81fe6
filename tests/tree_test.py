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


def test_path_predicate_full_match():
  paths = tree.leaf_paths(_params())
  keep = tree.path_predicate(include=r"encoder/.*/kernel")
  assert [p for p in paths if keep(p)] == ["encoder/0/kernel"]
  keep = tree.path_predicate(exclude=["head/.*", ".*bias"])
  assert [p for p in paths if keep(p)] == ["encoder/0/kernel"]
  # Patterns match the whole path (fullmatch), not a substring: "kernel" alone selects nothing.
  assert not any(tree.path_predicate(include="kernel")(p) for p in paths)
  assert tree.path_predicate()("anything/at/all")


def test_num_params():
  assert tree.num_params(_params()) == 4
