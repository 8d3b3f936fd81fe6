"""A small Vision Transformer: patch embedding, pre-LN transformer blocks, pooling, linear head.

The parameter tree is {"backbone": ..., "head": ...}, so the head is separated from the mergeable
image encoder by its top-level path, as with CLIP's frozen zero-shot head.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


class EncoderBlock(nn.Module):
  """Pre-LN block: x + MHA(LN(x)), then x + MLP(LN(x)).

  Attributes:
    num_heads: attention heads.
    mlp_dim: hidden units of the MLP.
  """

  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.LayerNorm(name="ln_1")(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, name="attn")(y, y)
    x = x + y
    y = nn.LayerNorm(name="ln_2")(x)
    y = nn.Dense(self.mlp_dim, name="mlp_in")(y)
    y = nn.Dense(x.shape[-1], name="mlp_out")(nn.gelu(y))
    return x + y


class ViTBackbone(nn.Module):
  """Image encoder: [n, H, W] or [n, H, W, C] images -> [n, dim] pooled features.

  Attributes:
    patch_size: side of the square patches.
    dim: token width.
    depth: number of encoder blocks.
    num_heads: attention heads per block.
    mlp_dim: hidden units of each block's MLP.
    pool: "cls" (a learned class token) or "gap" (mean over patch tokens).
  """

  patch_size: int = 2
  dim: int = 64
  depth: int = 2
  num_heads: int = 4
  mlp_dim: int = 128
  pool: str = "gap"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim == 3:
      x = x[..., None]
    p = self.patch_size
    # Patch embedding as a strided convolution, i.e. a linear map of each flattened patch.
    x = nn.Conv(self.dim, (p, p), strides=(p, p), padding="VALID", name="embedding")(x)
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c)
    if self.pool == "cls":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
      x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)), x], axis=1)
    elif self.pool != "gap":
      raise ValueError(f"Unknown pool {self.pool!r}; use 'cls' or 'gap'.")
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1, x.shape[1], c))
    x = x + pos
    for i in range(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_dim, name=f"block_{i}")(x)
    x = nn.LayerNorm(name="ln_final")(x)
    return x[:, 0] if self.pool == "cls" else x.mean(axis=1)


class ViT(nn.Module):
  """ViT classifier with params {"backbone": ..., "head": ...}.

  Attributes:
    num_classes: number of output classes.
    patch_size: side of the square patches.
    dim: token width.
    depth: number of encoder blocks.
    num_heads: attention heads per block.
    mlp_dim: hidden units of each block's MLP.
    pool: "cls" or "gap".
  """

  num_classes: int = 10
  patch_size: int = 2
  dim: int = 64
  depth: int = 2
  num_heads: int = 4
  mlp_dim: int = 128
  pool: str = "gap"

  def setup(self):
    self.backbone = ViTBackbone(
      patch_size=self.patch_size,
      dim=self.dim,
      depth=self.depth,
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
      pool=self.pool,
    )
    self.head = nn.Dense(self.num_classes)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.head(self.backbone(jnp.asarray(x, jnp.float32)))
