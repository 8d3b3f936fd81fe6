"""Flax linen port of Hugging Face CLIP (vision and text towers, projections, logit scale).

Parameter pytrees mirror the transformers state dict one to one (see `mergejax.io.names`):
`vision_model/encoder/layers_0/self_attn/q_proj/kernel` is `vision_model.encoder.layers.0.
self_attn.q_proj.weight` transposed. Images are NHWC (transformers takes NCHW).

>>> import jax, jax.numpy as jnp
>>> cfg = CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
...                        num_attention_heads=2, image_size=8, patch_size=4)
>>> tower = CLIPVisionTransformer(cfg)
>>> params = tower.init(jax.random.key(0), jnp.zeros([1, 8, 8, 3]))["params"]
>>> tower.apply({"params": params}, jnp.zeros([2, 8, 8, 3]))[1].shape
(2, 8)
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mergejax.models import layers
from mergejax.tree import Params

# The normalisation transformers' CLIPImageProcessor applies after scaling pixels to [0, 1].
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def _pick(cls, d: dict) -> dict:
  names = {f.name for f in dataclasses.fields(cls)}
  return {k: v for k, v in d.items() if k in names}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """The fields of transformers' CLIPVisionConfig that the forward pass uses (same defaults)."""

  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 512

  @classmethod
  def from_dict(cls, d: dict) -> "CLIPVisionConfig":
    """Builds the config from a config.json dict, ignoring fields the forward pass does not use."""
    return cls(**_pick(cls, d))


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """The fields of transformers' CLIPTextConfig that the forward pass uses (same defaults)."""

  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407
  projection_dim: int = 512

  @classmethod
  def from_dict(cls, d: dict) -> "CLIPTextConfig":
    """Builds the config from a config.json dict, ignoring fields the forward pass does not use."""
    return cls(**_pick(cls, d))


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Two towers plus the shared projection size (transformers' CLIPConfig)."""

  text_config: CLIPTextConfig = CLIPTextConfig()
  vision_config: CLIPVisionConfig = CLIPVisionConfig()
  projection_dim: int = 512
  logit_scale_init_value: float = 2.6592

  @classmethod
  def from_dict(cls, d: dict) -> "CLIPConfig":
    """Builds the config from a (model_type "clip") config.json dict."""
    return cls(
      text_config=CLIPTextConfig.from_dict(d.get("text_config") or {}),
      vision_config=CLIPVisionConfig.from_dict(d.get("vision_config") or {}),
      projection_dim=d.get("projection_dim", 512),
      logit_scale_init_value=d.get("logit_scale_init_value", 2.6592),
    )


class CLIPAttention(nn.Module):
  """Self-attention with q/k/v/out projections named as in transformers."""

  hidden_size: int
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    dense = lambda name: nn.Dense(self.hidden_size, dtype=self.dtype, name=name)
    q, k, v = dense("q_proj")(x), dense("k_proj")(x), dense("v_proj")(x)
    out = layers.dot_product_attention(q, k, v, bias, self.num_heads)
    return dense("out_proj")(out)


class CLIPMLP(nn.Module):
  """fc1 -> activation -> fc2."""

  hidden_size: int
  intermediate_size: int
  hidden_act: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(x)
    x = layers.get_activation(self.hidden_act)(x)
    return nn.Dense(self.hidden_size, dtype=self.dtype, name="fc2")(x)


def _layer_norm(eps: float, dtype: Any, name: str) -> nn.LayerNorm:
  # use_fast_variance=False: E[(x - mean)^2] as torch computes it; E[x^2] - mean^2 loses ~1e-5.
  return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


class CLIPEncoder(nn.Module):
  """Pre-LayerNorm transformer stack; one `layers_<i>` subtree per layer (one leaf per tensor)."""

  config: CLIPVisionConfig | CLIPTextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    c = self.config
    for i in range(c.num_hidden_layers):
      x = _EncoderLayer(c, self.dtype, name=f"layers_{i}")(x, bias)
    return x


class _EncoderLayer(nn.Module):
  config: CLIPVisionConfig | CLIPTextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
    c = self.config
    h = _layer_norm(c.layer_norm_eps, self.dtype, "layer_norm1")(x)
    x = x + CLIPAttention(c.hidden_size, c.num_attention_heads, self.dtype, name="self_attn")(
      h, bias
    )
    h = _layer_norm(c.layer_norm_eps, self.dtype, "layer_norm2")(x)
    mlp = CLIPMLP(c.hidden_size, c.intermediate_size, c.hidden_act, self.dtype, name="mlp")
    return x + mlp(h)


class CLIPVisionEmbeddings(nn.Module):
  """Class token + non-overlapping patch convolution + learned positions."""

  config: CLIPVisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    c = self.config
    cls_token = self.param("class_embedding", nn.initializers.normal(0.02), (c.hidden_size,))
    patches = nn.Conv(
      c.hidden_size,
      (c.patch_size, c.patch_size),
      strides=(c.patch_size, c.patch_size),
      padding="VALID",
      use_bias=False,
      dtype=self.dtype,
      name="patch_embedding",
    )(pixel_values.astype(self.dtype))
    b = patches.shape[0]
    # Row-major flatten of the patch grid matches torch's `flatten(2).transpose(1, 2)` on NCHW.
    patches = patches.reshape(b, -1, c.hidden_size)
    cls_tokens = jnp.broadcast_to(cls_token.astype(patches.dtype), (b, 1, c.hidden_size))
    x = jnp.concatenate([cls_tokens, patches], axis=1)
    num_positions = (c.image_size // c.patch_size) ** 2 + 1
    pos = nn.Embed(num_positions, c.hidden_size, dtype=self.dtype, name="position_embedding")
    return x + pos(jnp.arange(num_positions))[None]


class CLIPVisionTransformer(nn.Module):
  """transformers' CLIPVisionModel: returns `(last_hidden_state, pooled)`, pooled = LN(CLS)."""

  config: CLIPVisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
    c = self.config
    x = CLIPVisionEmbeddings(c, self.dtype, name="embeddings")(pixel_values)
    x = _layer_norm(c.layer_norm_eps, self.dtype, "pre_layrnorm")(x)  # sic, as in transformers.
    x = CLIPEncoder(c, self.dtype, name="encoder")(x)
    pooled = _layer_norm(c.layer_norm_eps, self.dtype, "post_layernorm")(x[:, 0])
    return x, pooled


class CLIPTextEmbeddings(nn.Module):
  """Token + learned absolute position embeddings."""

  config: CLIPTextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    c = self.config
    tok = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, name="token_embedding")
    pos = nn.Embed(
      c.max_position_embeddings, c.hidden_size, dtype=self.dtype, name="position_embedding"
    )
    return tok(input_ids) + pos(jnp.arange(input_ids.shape[-1]))[None]


class CLIPTextTransformer(nn.Module):
  """transformers' CLIPTextModel: causal encoder; pooled = final-LN state at the EOS token."""

  config: CLIPTextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self, input_ids: jax.Array, attention_mask: jax.Array | None = None
  ) -> tuple[jax.Array, jax.Array]:
    c = self.config
    length = input_ids.shape[-1]
    x = CLIPTextEmbeddings(c, self.dtype, name="embeddings")(input_ids)
    allowed = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if attention_mask is not None:
      allowed = allowed & attention_mask.astype(bool)[:, None, None, :]
    bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)
    x = CLIPEncoder(c, self.dtype, name="encoder")(x, bias)
    x = _layer_norm(c.layer_norm_eps, self.dtype, "final_layer_norm")(x)
    if c.eos_token_id == 2:
      # Legacy configs (before transformers PR #24773): EOS is the largest token id.
      eos_pos = jnp.argmax(input_ids, axis=-1)
    else:
      eos_pos = jnp.argmax((input_ids == c.eos_token_id).astype(jnp.int32), axis=-1)
    pooled = jnp.take_along_axis(x, eos_pos[:, None, None], axis=1)[:, 0]
    return x, pooled


class CLIPModel(nn.Module):
  """Both towers, bias-free projections and the learned temperature (transformers' CLIPModel)."""

  config: CLIPConfig
  dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    self.text_model = CLIPTextTransformer(c.text_config, self.dtype)
    self.vision_model = CLIPVisionTransformer(c.vision_config, self.dtype)
    self.visual_projection = nn.Dense(c.projection_dim, use_bias=False, dtype=self.dtype)
    self.text_projection = nn.Dense(c.projection_dim, use_bias=False, dtype=self.dtype)
    self.logit_scale = self.param(
      "logit_scale", nn.initializers.constant(c.logit_scale_init_value), ()
    )

  def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
    """Projected (unnormalised) image embeddings `[B, projection_dim]` from NHWC pixels."""
    return self.visual_projection(self.vision_model(pixel_values)[1])

  def get_text_features(
    self, input_ids: jax.Array, attention_mask: jax.Array | None = None
  ) -> jax.Array:
    """Projected (unnormalised) text embeddings `[B, projection_dim]`."""
    return self.text_projection(self.text_model(input_ids, attention_mask)[1])

  def __call__(
    self, input_ids: jax.Array, pixel_values: jax.Array, attention_mask: jax.Array | None = None
  ) -> jax.Array:
    """Returns `logits_per_image` `[B_images, B_texts]` (cosine similarity x exp(logit_scale))."""
    img = self.get_image_features(pixel_values)
    txt = self.get_text_features(input_ids, attention_mask)
    img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
    txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
    return jnp.exp(self.logit_scale) * img @ txt.T


def vision_tower(params: Params) -> Params:
  """Returns the vision-tower subtree of CLIPModel or CLIPVisionModel parameters.

  Old CLIPVisionModel checkpoints (transformers < 5, e.g. FusionBench's) prefix every tensor with
  "vision_model."; transformers 5 writes them unprefixed; a CLIPModel holds it under
  "vision_model" beside the text tower. All three give the same subtree here.

  Args:
    params: parameters as loaded by `mergejax.io.names`.

  Returns:
    The `CLIPVisionTransformer` parameters.
  """
  return params["vision_model"] if "vision_model" in params else params


def normalize_pixels(images: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
  """Maps uint8 NHWC images (already resized and cropped) to CLIP's normalised input.

  Args:
    images: `[B, H, W, 3]` uint8 (or floats in [0, 255]).
    dtype: output dtype.

  Returns:
    `(images / 255 - mean) / std` in `dtype`.
  """
  mean = jnp.asarray(IMAGE_MEAN, jnp.float32)
  std = jnp.asarray(IMAGE_STD, jnp.float32)
  return ((images.astype(jnp.float32) / 255.0 - mean) / std).astype(dtype)
