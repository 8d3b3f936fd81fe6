"""Runs the `>>>` examples in every library module's docstrings, so documentation cannot rot."""

import doctest
import importlib
import pkgutil

import jax.numpy as jnp
import pytest

import mergejax


def _modules_with_examples():
  """Every mergejax module (benchmarks included) whose source holds a `>>>` example."""
  names = []
  for info in pkgutil.walk_packages(mergejax.__path__, prefix="mergejax."):
    spec = importlib.util.find_spec(info.name)
    if spec and spec.origin and spec.origin.endswith(".py"):
      with open(spec.origin, encoding="utf-8") as f:
        if ">>>" in f.read():
          names.append(info.name)
  return names


MODULES = _modules_with_examples()


def test_the_core_has_examples():
  # The walk must find the key entry points: otherwise the tests below pass vacuously.
  assert {"mergejax.rules.averaging", "mergejax.rules.spec", "mergejax.selection"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, extraglobs={"jnp": jnp}, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0, "no example found: the test would pass vacuously"
  assert result.failed == 0
