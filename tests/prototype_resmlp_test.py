"""ResMLP backbone and the cosine prototype head: shapes, hand-worked logits, padding, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax.models import prototype, resmlp


@pytest.mark.parametrize("patch_size", [None, 4])
def test_resmlp_features(patch_size):
  net = resmlp.ResMLPBackbone(width=16, depth=2, patch_size=patch_size)
  x = jnp.asarray(np.random.default_rng(0).random((3, 8, 8, 3)), jnp.float32)
  params = net.init(jax.random.key(0), x)["params"]
  out = net.apply({"params": params}, x)
  assert out.shape == (3, 16) and np.all(np.isfinite(out))
  assert set(params) == {"embed", "block_0", "block_1", "ln_final"}


def test_resmlp_rejects_indivisible_patches():
  with pytest.raises(ValueError, match="not divisible"):
    resmlp.ResMLPBackbone(width=8, depth=1, patch_size=3).init(
      jax.random.key(0), jnp.zeros((1, 8, 8, 3))
    )


def test_prototype_head_logits_by_hand():
  feats = np.array([[2.0, 0.0], [4.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
  head = prototype.prototype_head(feats, np.array([0, 0, 1, 1]), num_classes=2, temperature=0.5)
  np.testing.assert_allclose(head["prototypes"], [[1.0, 0.0], [0.0, 1.0]], atol=1e-7)
  model = prototype.PrototypeClassifier(backbone=prototype.Identity(), num_classes=2)
  x = jnp.array([[3.0, 4.0]])  # cos with the prototypes: 0.6 and 0.8; logits = cos / T.
  logits = model.apply({"params": {"backbone": {}, "head": head}}, x)
  np.testing.assert_allclose(logits, [[1.2, 1.6]], rtol=1e-6)


def test_prototype_head_padding_and_centering():
  feats = np.array([[1.0, 1.0], [1.0, 3.0], [3.0, 1.0]])
  head = prototype.prototype_head(feats, np.array([0, 1, 2]), num_classes=3, pad_to=5, center=True)
  assert head["prototypes"].shape == (5, 2)
  np.testing.assert_array_equal(
    head["logit_bias"], [0, 0, 0, prototype.PAD_LOGIT, prototype.PAD_LOGIT]
  )
  np.testing.assert_allclose(head["center"], [5 / 3, 5 / 3], rtol=1e-6)
  model = prototype.PrototypeClassifier(backbone=prototype.Identity(), num_classes=5)
  logits = model.apply({"params": {"backbone": {}, "head": head}}, jnp.asarray(feats))
  np.testing.assert_array_equal(np.argmax(logits, -1), [0, 1, 2])
  assert np.all(np.isfinite(jax.nn.log_softmax(logits)))  # Padding gives no NaN.


def test_prototype_head_needs_a_shot_per_class():
  with pytest.raises(ValueError, match="needs a shot"):
    prototype.prototype_head(np.ones((2, 3)), np.array([0, 0]), num_classes=2)


@pytest.mark.parametrize("mode", ["standard", "sam", "asam", "linearized"])
def test_prototype_classifier_fine_tunes_in_every_mode_with_the_head_frozen(mode):
  from mergejax import finetune
  from mergejax.benchmarks.common.data import Split

  rng = np.random.default_rng(0)
  data = Split(x=rng.random((32, 4, 4, 3)).astype(np.float32), y=rng.integers(0, 3, 32))
  model = prototype.PrototypeClassifier(
    backbone=resmlp.ResMLPBackbone(width=8, depth=1), num_classes=4
  )
  backbone = model.init(jax.random.key(0), jnp.asarray(data.x[:1]))["params"]["backbone"]
  feats = model.backbone.apply({"params": backbone}, jnp.asarray(data.x))
  head = prototype.prototype_head(feats, data.y, num_classes=3, pad_to=4)
  cfg = finetune.TrainConfig(
    steps=4, batch_size=8, learning_rate=1e-2, warmup_steps=1, chunk=4, decay_to_init=True
  )
  out, losses = finetune.train(model, {"backbone": backbone, "head": head}, data, cfg, mode=mode)
  assert np.all(np.isfinite(losses))
  assert out["head"] is head
  assert not np.allclose(out["backbone"]["embed"]["kernel"], backbone["embed"]["kernel"])
