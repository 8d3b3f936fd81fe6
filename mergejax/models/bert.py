"""Flax linen port of the Hugging Face BERT encoder (BertModel), names as in transformers.

`encoder/layer_0/attention/self/query/kernel` is `encoder.layer.0.attention.self.query.weight`
transposed; `mergejax.io.names` does the mapping. Checkpoints of task models
(BertForSequenceClassification) hold this tree under "bert" beside their "classifier".

>>> import jax, jax.numpy as jnp
>>> cfg = BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
...                  intermediate_size=16, max_position_embeddings=8)
>>> model = BertModel(cfg)
>>> ids = jnp.ones([2, 5], jnp.int32)
>>> params = model.init(jax.random.key(0), ids)["params"]
>>> model.apply({"params": params}, ids)[0].shape
(2, 5, 8)
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mergejax.models import layers


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The fields of transformers' BertConfig that the forward pass uses (same defaults)."""

  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  position_embedding_type: str = "absolute"

  @classmethod
  def from_dict(cls, d: dict) -> "BertConfig":
    """Builds the config from a config.json dict, ignoring fields the forward pass does not use."""
    names = {f.name for f in dataclasses.fields(cls)}
    config = cls(**{k: v for k, v in d.items() if k in names})
    if config.position_embedding_type != "absolute":
      raise NotImplementedError("Only absolute position embeddings are supported.")
    return config


def _layer_norm(eps: float, dtype: Any) -> nn.LayerNorm:
  # use_fast_variance=False: torch's E[(x - mean)^2], not E[x^2] - mean^2.
  return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name="LayerNorm")


class BertEmbeddings(nn.Module):
  """Word + absolute position + token type embeddings, then LayerNorm (dropout: inference only)."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
    c = self.config
    embed = lambda n, name: nn.Embed(n, c.hidden_size, dtype=self.dtype, name=name)
    x = embed(c.vocab_size, "word_embeddings")(input_ids)
    x = x + embed(c.max_position_embeddings, "position_embeddings")(jnp.arange(input_ids.shape[-1]))
    x = x + embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids)
    return _layer_norm(c.layer_norm_eps, self.dtype)(x)


class _SelfAttention(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    dense = lambda name: nn.Dense(self.config.hidden_size, dtype=self.dtype, name=name)
    q, k, v = dense("query")(x), dense("key")(x), dense("value")(x)
    return layers.dot_product_attention(q, k, v, bias, self.config.num_attention_heads)


class _DenseAddNorm(nn.Module):
  """transformers' BertSelfOutput / BertOutput: LayerNorm(dense(h) + residual), post-LN."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array, residual: jax.Array) -> jax.Array:
    h = nn.Dense(self.config.hidden_size, dtype=self.dtype, name="dense")(h)
    return _layer_norm(self.config.layer_norm_eps, self.dtype)(h + residual)


class _Attention(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    h = _SelfAttention(self.config, self.dtype, name="self")(x, bias)
    return _DenseAddNorm(self.config, self.dtype, name="output")(h, x)


class _Intermediate(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Dense(self.config.intermediate_size, dtype=self.dtype, name="dense")(x)
    return layers.get_activation(self.config.hidden_act)(x)


class BertLayer(nn.Module):
  """Post-LN transformer layer: attention -> add&norm -> intermediate -> add&norm."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    x = _Attention(self.config, self.dtype, name="attention")(x, bias)
    h = _Intermediate(self.config, self.dtype, name="intermediate")(x)
    return _DenseAddNorm(self.config, self.dtype, name="output")(h, x)


class _Encoder(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    for i in range(self.config.num_hidden_layers):
      x = BertLayer(self.config, self.dtype, name=f"layer_{i}")(x, bias)
    return x


class _Pooler(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.tanh(nn.Dense(self.config.hidden_size, dtype=self.dtype, name="dense")(x[:, 0]))


class BertModel(nn.Module):
  """transformers' BertModel: returns `(last_hidden_state, pooled)`; pooled is None without pooler.

  Attributes:
    config: the architecture.
    add_pooling_layer: whether the tree has `pooler/dense` (tanh(dense(CLS))). Sentence-
      transformers checkpoints carry it but do not use it.
    dtype: computation dtype (parameters stay fp32; softmax and LayerNorm statistics in fp32).
  """

  config: BertConfig
  add_pooling_layer: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    token_type_ids: jax.Array | None = None,
  ) -> tuple[jax.Array, jax.Array | None]:
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = BertEmbeddings(self.config, self.dtype, name="embeddings")(input_ids, token_type_ids)
    # Padding keys get the most negative fp32 logit, as transformers' additive mask does.
    bias = jnp.where(attention_mask.astype(bool), 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
    x = _Encoder(self.config, self.dtype, name="encoder")(x, bias)
    pooled = None
    if self.add_pooling_layer:
      pooled = _Pooler(self.config, self.dtype, name="pooler")(x)
    return x, pooled


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """Sentence-transformers' mean pooling: average of the token states where the mask is 1.

  Args:
    hidden: `[B, L, D]` last hidden states.
    attention_mask: `[B, L]` 0/1.

  Returns:
    `[B, D]` fp32 sentence embeddings (not normalised).
  """
  mask = attention_mask.astype(jnp.float32)[..., None]
  summed = jnp.sum(hidden.astype(jnp.float32) * mask, axis=1)
  # Same clamp as sentence-transformers (1e-9), so an all-padding row gives 0, not NaN.
  return summed / jnp.clip(jnp.sum(mask, axis=1), 1e-9)
