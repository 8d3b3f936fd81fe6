"""Models: output shapes, and the backbone / head separation by top-level parameter path."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax import models
from mergejax import tree as tree_lib

_CASES = [
  ("mlp", dict(width=16, depth=2)),
  ("vit", dict(patch_size=4, dim=8, depth=1, num_heads=2, mlp_dim=16, pool="gap")),
  ("vit", dict(patch_size=2, dim=8, depth=2, num_heads=2, mlp_dim=16, pool="cls")),
]


@pytest.mark.parametrize("name,kwargs", _CASES)
def test_shapes_and_separation(name, kwargs):
  model = models.build_model(name, **kwargs)
  x = jnp.asarray(np.random.default_rng(0).random((3, 8, 8)), jnp.float32)
  params = model.init(jax.random.key(0), x)["params"]
  assert set(params) == {"backbone", "head"}
  assert model.apply({"params": params}, x).shape == (3, 10)
  # The head is one Dense layer on the backbone's features; nothing else lives at the top level.
  assert set(params["head"]) == {"kernel", "bias"}
  assert params["head"]["kernel"].shape[1] == 10
  assert all(p.startswith(("backbone/", "head/")) for p in tree_lib.flatten(params))


@pytest.mark.parametrize("name,kwargs", _CASES[:2])
def test_backbone_and_head_both_matter(name, kwargs):
  model = models.build_model(name, **kwargs)
  x = jnp.asarray(np.random.default_rng(1).random((4, 8, 8)), jnp.float32)
  params = model.init(jax.random.key(0), x)["params"]
  out = model.apply({"params": params}, x)
  bumped_backbone = {**params, "backbone": jax.tree.map(lambda a: a + 0.1, params["backbone"])}
  bumped_head = {**params, "head": jax.tree.map(lambda a: a + 0.1, params["head"])}
  assert not np.allclose(model.apply({"params": bumped_backbone}, x), out)
  assert not np.allclose(model.apply({"params": bumped_head}, x), out)


def test_vit_accepts_channel_axis_and_rejects_bad_pool():
  model = models.build_model("vit", patch_size=4, dim=8, depth=1, num_heads=2, mlp_dim=16)
  x = jnp.zeros((2, 8, 8, 1))
  params = model.init(jax.random.key(0), x)["params"]
  np.testing.assert_allclose(
    model.apply({"params": params}, x), model.apply({"params": params}, x[..., 0]), atol=1e-6
  )
  with pytest.raises(ValueError, match="pool"):
    models.build_model("vit", pool="max").init(jax.random.key(0), x)


def test_vit_blocks_are_pre_layernorm():
  model = models.build_model("vit", patch_size=4, dim=8, depth=2, num_heads=2, mlp_dim=16)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8)))["params"]["backbone"]
  assert {"block_0", "block_1", "embedding", "pos_embedding", "ln_final"} <= set(params)
  assert {"ln_1", "attn", "ln_2", "mlp_in", "mlp_out"} == set(params["block_0"])


def test_unknown_model_raises():
  with pytest.raises(ValueError, match="Unknown model"):
    models.build_model("resnet")
  assert isinstance(models.build_model("mlp"), nn.Module)
