"""Zero-shot-style classification heads: cosine similarity to class prototypes, frozen.

CLIP classifies an image by the cosine similarity of its embedding to one text embedding per
class, times a temperature (logit scale). `PrototypeClassifier` does the same with prototypes made
from the image encoder itself: the normalized mean feature of a few labelled shots per class
(`prototype_head`). The head is built once from the pre-trained encoder and never trained, so
every expert and every merge of the encoder is read out by the same frozen head, as with CLIP's
text heads.

Heads of tasks with fewer classes are padded to a common size with `logit_bias = -1e9` on the
padding rows, so all tasks share one head shape (one compilation) and padding never wins.

>>> import jax, jax.numpy as jnp, numpy as np
>>> feats = jnp.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
>>> head = prototype_head(feats, np.array([0, 0, 1]), num_classes=2, pad_to=3, temperature=0.1)
>>> model = PrototypeClassifier(backbone=Identity(), num_classes=3)
>>> logits = model.apply({"params": {"backbone": {}, "head": head}}, jnp.array([[0.0, 2.0]]))
>>> int(jnp.argmax(logits)), float(logits[0, 2]) < -1e8
(1, True)
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mergejax.tree import Params

PAD_LOGIT = -1e9  # Logit of padding classes: exp() underflows to 0, no NaN in log-softmax.


def _normalize(x: jax.Array, eps: float = 1e-8) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class CosinePrototypeHead(nn.Module):
  """logits = logit_scale * cos(f - center, prototypes) + logit_bias.

  Its parameters are set by `prototype_head`, not learned; the initializers only give shapes.

  Attributes:
    num_classes: number of rows (classes, padding included).
  """

  num_classes: int

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    d = features.shape[-1]
    center = self.param("center", nn.initializers.zeros, (d,))
    prototypes = self.param("prototypes", nn.initializers.normal(1.0), (self.num_classes, d))
    logit_bias = self.param("logit_bias", nn.initializers.zeros, (self.num_classes,))
    logit_scale = self.param("logit_scale", nn.initializers.constant(10.0), ())
    cos = _normalize(features - center) @ _normalize(prototypes).T
    return logit_scale * cos + logit_bias


class Identity(nn.Module):
  """A parameter-free backbone (for tests and examples)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return x


class PrototypeClassifier(nn.Module):
  """Any backbone read out by a cosine prototype head: params {"backbone", "head"}.

  Attributes:
    backbone: the image encoder ([n, ...] -> [n, d] features).
    num_classes: head rows (the largest task's classes when heads are padded).
  """

  backbone: nn.Module
  num_classes: int

  def setup(self):
    self.head = CosinePrototypeHead(self.num_classes)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.head(self.backbone(x))


def prototype_head(
  features: jax.Array | np.ndarray,
  labels: np.ndarray,
  *,
  num_classes: int,
  pad_to: int | None = None,
  temperature: float = 0.05,
  center: bool = False,
) -> Params:
  """Builds a frozen head from the features of a few labelled shots.

  Args:
    features: [n, d] encoder features of the shots.
    labels: [n] integer classes in [0, num_classes); every class needs at least one shot.
    num_classes: the task's number of classes.
    pad_to: head rows (>= num_classes); the extra rows are padding that never wins.
    temperature: T in logits = cos / T (CLIP's 1 / logit_scale).
    center: subtract the mean feature of the shots before normalizing (a shared offset of
      all features otherwise dominates every cosine).

  Returns:
    {"center": [d], "prototypes": [pad_to, d] unit rows, "logit_bias": [pad_to],
     "logit_scale": ()}, float32 arrays.
  """
  features = np.asarray(features, np.float64)
  labels = np.asarray(labels)
  pad_to = num_classes if pad_to is None else pad_to
  if pad_to < num_classes:
    raise ValueError(f"pad_to={pad_to} is smaller than num_classes={num_classes}.")
  counts = np.bincount(labels, minlength=num_classes)
  if len(counts) > num_classes or (counts == 0).any():
    raise ValueError(f"Every class in [0, {num_classes}) needs a shot; counts {counts.tolist()}.")
  mu = features.mean(axis=0) if center else np.zeros(features.shape[1])
  z = features - mu
  z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-8)
  protos = np.zeros((pad_to, features.shape[1]))
  np.add.at(protos, labels, z)
  protos[:num_classes] /= np.linalg.norm(protos[:num_classes], axis=1, keepdims=True)
  bias = np.where(np.arange(pad_to) < num_classes, 0.0, PAD_LOGIT)
  return {
    "center": jnp.asarray(mu, jnp.float32),
    "prototypes": jnp.asarray(protos, jnp.float32),
    "logit_bias": jnp.asarray(bias, jnp.float32),
    "logit_scale": jnp.asarray(1.0 / temperature, jnp.float32),
  }
