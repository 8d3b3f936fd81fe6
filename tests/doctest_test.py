"""Runs the `>>>` examples in the core modules' docstrings, so documentation cannot rot."""

import doctest

import jax.numpy as jnp
import pytest

from mergejax import rules, selection
from mergejax.models import prototype, resmlp


@pytest.mark.parametrize("module", [rules, selection, prototype, resmlp], ids=lambda m: m.__name__)
def test_docstring_examples(module):
  result = doctest.testmod(module, extraglobs={"jnp": jnp}, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0, "no example found: the test would pass vacuously"
  assert result.failed == 0
