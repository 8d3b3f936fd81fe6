"""The README's "Extending mergejax" examples run as written; doctests of the learned modules."""

import doctest
import pathlib
import re
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import learned as recipes_lib
from mergejax import learned, losses
from mergejax.benchmarks import synthetic
from mergejax.learned import parametrizations, problem

_README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _extending_blocks() -> list[str]:
  text = _README.read_text()
  start = text.index("### Extending mergejax")
  end = text.index("\n## ", start)
  return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.DOTALL)


@pytest.fixture(scope="module")
def synthetic_problem():
  raw = synthetic.make_problem(3, num_tasks=2, hidden=16, num_train=48, num_val=32, num_test=32)
  return synthetic.learn_problem(raw)


def test_recipe_only_method_is_one_file(tmp_path, monkeypatch, synthetic_problem):
  recipe = _extending_blocks()[0]
  package = tmp_path / "readme_recipes"
  package.mkdir()
  (package / "__init__.py").write_text("")
  (package / "adamerging_dare.py").write_text(recipe)
  monkeypatch.syspath_prepend(str(tmp_path))
  found = recipes_lib.recipes("readme_recipes")  # The benchmark's discovery, on this package.
  assert list(found) == ["adamerging_dare"]
  config = found["adamerging_dare"].get_config("runlocal")
  config.lock()
  assert config.label == "AdaMerging layer-wise (DARE basis)"
  result = learned.run(synthetic_problem, config)
  assert result.transductive and result.selected == {"steps": config.train.steps}
  # The same recipe with the task-vector basis learns something else: the file changed the method.
  plain = learned.run(synthetic_problem, recipes_lib.recipes()["adamerging"].get_config("runlocal"))
  assert not np.allclose(result.coeffs, plain.coeffs)
  sys.modules.pop("readme_recipes.adamerging_dare", None)
  sys.modules.pop("readme_recipes", None)


def test_new_parametrization_plugs_into_the_loop(synthetic_problem):
  code = _extending_blocks()[1]
  namespace = {"problem": synthetic_problem}
  exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102  (the README's own example)
  result = namespace["result"]
  assert set(result.final_coeffs) == {"u", "v"}
  assert result.final_coeffs["u"].shape == (2,)
  assert not np.allclose(result.final_coeffs["u"], np.sqrt(0.3))  # It trained.
  chex.assert_trees_all_equal_shapes_and_dtypes(result.params, synthetic_problem.base)
  # At init the rank-one Λ is blockwise scaling with every coefficient 0.3.
  base, experts = synthetic_problem.base, synthetic_problem.experts
  blocks = parametrizations.make_blocks(base, granularity="layer")
  basis = [jax.tree.map(jnp.subtract, e, base) for e in experts]
  merged = []
  for scaling in (
    namespace["rank_one_scaling"](blocks),
    parametrizations.blockwise_scaling(blocks),
  ):
    merged.append(scaling.merge(scaling.init(base, basis), base, basis))
  chex.assert_trees_all_close(*merged, rtol=1e-6)


@pytest.mark.parametrize("module", [losses, parametrizations, problem], ids=lambda m: m.__name__)
def test_docstring_examples(module):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0, "no example found: the test would pass vacuously"
  assert result.failed == 0
