"""A small pre-LN residual MLP image encoder (the synthvision benchmark's fast default backbone).

With `patch_size` set it is a ResMLP in the sense of Touvron et al. (2021): the image is cut into
patches embedded by one shared linear map, and each block mixes information across patches with a
linear layer over the patch axis, then applies an MLP to every patch, both as pre-LN residual
branches; the features are the mean over patches after a final LayerNorm. Without `patch_size`
the image is flattened and the blocks are MLPs on one vector. The residual stream and LayerNorms
make the function change smoothly with the weights, the regime where task vectors add up; sharing
weights across patches gives the translation equivariance a flat MLP must learn from data.

>>> import jax, jax.numpy as jnp
>>> net = ResMLPBackbone(width=8, depth=1, patch_size=2)
>>> params = net.init(jax.random.key(0), jnp.zeros([1, 4, 4, 3]))["params"]
>>> net.apply({"params": params}, jnp.zeros([2, 4, 4, 3])).shape
(2, 8)
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS = {"gelu": nn.gelu, "relu": nn.relu}


class MLPBlock(nn.Module):
  """Pre-LN MLP branch on the last axis: x + W2 act(W1 LN(x)).

  Attributes:
    hidden: hidden units.
    activation: "gelu" or "relu".
  """

  hidden: int
  activation: str = "gelu"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.LayerNorm(name="ln")(x)
    y = ACTIVATIONS[self.activation](nn.Dense(self.hidden, name="dense_in")(y))
    return x + nn.Dense(x.shape[-1], name="dense_out")(y)


class PatchMixBlock(nn.Module):
  """ResMLP block: a pre-LN linear map across patches, then a pre-LN MLP on each patch.

  Attributes:
    hidden: hidden units of the per-patch MLP.
    activation: "gelu" or "relu".
  """

  hidden: int
  activation: str = "gelu"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [n, patches, width]
    y = nn.LayerNorm(name="ln_mix")(x)
    # Dense over the patch axis: every output patch is a learned combination of all patches.
    y = nn.Dense(x.shape[1], name="mix")(jnp.swapaxes(y, 1, 2))
    x = x + jnp.swapaxes(y, 1, 2)
    return MLPBlock(self.hidden, self.activation, name="mlp")(x)


class ResMLPBackbone(nn.Module):
  """Image encoder: [n, H, W, C] images -> [n, width] features (final LayerNorm included).

  Attributes:
    width: residual stream width (the feature dimension).
    depth: number of residual blocks.
    expansion: hidden units per MLP = expansion * width.
    patch_size: side of the square patches; None flattens the whole image into one vector.
    activation: "gelu" or "relu" in the MLPs.
  """

  width: int = 256
  depth: int = 3
  expansion: int = 2
  patch_size: int | None = None
  activation: str = "gelu"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"Unknown activation {self.activation!r}; known: {sorted(ACTIVATIONS)}.")
    x = jnp.asarray(x, jnp.float32)
    n = x.shape[0]
    if self.patch_size is None:
      x = nn.Dense(self.width, name="embed")(x.reshape(n, -1))
      for i in range(self.depth):
        x = MLPBlock(self.expansion * self.width, self.activation, name=f"block_{i}")(x)
      return nn.LayerNorm(name="ln_final")(x)
    if x.ndim == 3:
      x = x[..., None]
    p = self.patch_size
    _, h, w, c = x.shape
    if h % p or w % p:
      raise ValueError(f"Image {h}x{w} is not divisible into {p}x{p} patches.")
    x = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = nn.Dense(self.width, name="embed")(x.reshape(n, (h // p) * (w // p), p * p * c))
    for i in range(self.depth):
      x = PatchMixBlock(self.expansion * self.width, self.activation, name=f"block_{i}")(x)
    return nn.LayerNorm(name="ln_final")(x).mean(axis=1)
