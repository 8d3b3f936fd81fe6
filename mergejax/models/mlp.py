"""A small MLP classifier whose mergeable backbone and classification head are separate subtrees."""

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLPBackbone(nn.Module):
  """Flattens the image and applies `depth` Dense + GELU layers of `width` units.

  Attributes:
    width: hidden units per layer.
    depth: number of hidden layers.
  """

  width: int = 256
  depth: int = 2

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    for i in range(self.depth):
      x = nn.gelu(nn.Dense(self.width, name=f"dense_{i}")(x))
    return x


class MLP(nn.Module):
  """MLP classifier: params are {"backbone": ..., "head": ...}; only the backbone is merged.

  Attributes:
    num_classes: number of output classes.
    width: hidden units per backbone layer.
    depth: number of backbone layers.
  """

  num_classes: int = 10
  width: int = 256
  depth: int = 2

  def setup(self):
    self.backbone = MLPBackbone(width=self.width, depth=self.depth)
    self.head = nn.Dense(self.num_classes)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.head(self.backbone(jnp.asarray(x, jnp.float32)))
