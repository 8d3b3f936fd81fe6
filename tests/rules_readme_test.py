"""The README's data-free rule example ("Extending mergejax") runs as written, and everything that
should follow from one function plus one registry entry does: defaults, validation, traced λ,
patterns, the CLI config."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import merge as merge_config
from mergejax import rules, streaming
from mergejax import tree as tree_lib

_README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _rule_block() -> str:
  text = _README.read_text()
  start = text.index("### Extending mergejax")
  end = text.index("\n## ", start)
  blocks = re.findall(r"```python\n(.*?)```", text[start:end], flags=re.DOTALL)
  (block,) = [b for b in blocks if "spec.register(" in b]
  return block


@pytest.fixture
def readme_rule():
  base = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.zeros(3, jnp.bfloat16)}
  offsets = [1.0, -2.0, 4.0, 0.5]
  experts = [jax.tree.map(lambda x, o=o: (x + o).astype(x.dtype), base) for o in offsets]
  namespace = {"base": base, "experts": experts}
  exec(compile(_rule_block(), "README.md", "exec"), namespace)  # noqa: S102 (the README's example)
  yield namespace
  del rules.REGISTRY["trimmed_mean"]


def test_the_readme_rule_merges_as_documented(readme_rule):
  # Offsets {1, -2, 4, 0.5}: without the largest (4) and smallest (-2), the mean is 0.75; λ = 0.8.
  merged = readme_rule["merged"]
  np.testing.assert_allclose(merged["w"], np.arange(6.0).reshape(2, 3) + 0.8 * 0.75, rtol=1e-6)
  assert merged["b"].dtype == jnp.bfloat16  # The dtype policy comes with the front door.
  np.testing.assert_allclose(np.float32(merged["b"]), 0.6, rtol=1e-2)


def test_the_readme_rule_streams_in_flat_chunks(readme_rule):
  base, experts = readme_rule["base"], readme_rule["experts"]
  flat = tree_lib.flatten(base), [tree_lib.flatten(e) for e in experts]
  engine = streaming.StreamingMerge("trimmed_mean", *flat, {"scale": 0.8}, memory_budget=2**30)
  assert engine.flat_paths == set(flat[0])  # Declared elementwise: every leaf in flat chunks.
  for path, x in tree_lib.flatten(readme_rule["merged"]).items():
    np.testing.assert_array_equal(engine.leaf(path), np.asarray(x), err_msg=path)


def test_spec_validation_and_config_follow(readme_rule):
  base, experts = readme_rule["base"], readme_rule["experts"]
  assert rules.hparams_of("trimmed_mean") == {"scale": 1.0}  # From the function's signature.
  with pytest.raises(TypeError, match="scale='0.3' is a str"):
    rules.merge("trimmed_mean", base, experts, scale="0.3")
  with pytest.raises(ValueError, match="at least 3"):
    rules.merge("trimmed_mean", base, experts[:2])
  with pytest.raises(ValueError, match="match no leaf|matches no leaf"):
    rules.merge("trimmed_mean", base, experts, exclude="haed/.*")
  only_w = rules.merge("trimmed_mean", base, experts, include="w")
  np.testing.assert_array_equal(only_w["b"], base["b"])  # Unselected leaves come from θ0.
  config = merge_config.get_config("trimmed_mean")
  assert config.rule.to_dict() == {"scale": 1.0}


def test_a_scale_sweep_compiles_once(readme_rule):
  base, experts = readme_rule["base"], readme_rule["experts"]
  traces = []
  original = rules.REGISTRY["trimmed_mean"].fn

  def counting(base, experts, *, scale=1.0):
    traces.append(1)  # Runs once per trace: a retrace per λ would append three times.
    return original(base, experts, scale=scale)

  rules.spec.register("trimmed_mean", counting, scale=rules.spec.SCALE, min_experts=3)
  for scale in (0.1, 0.2, 0.3):
    rules.merge("trimmed_mean", base, experts, scale=scale)
  assert len(traces) == 1
