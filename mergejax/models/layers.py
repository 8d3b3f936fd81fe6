"""Pieces shared by the flax ports of Hugging Face transformers (CLIP, BERT).

Module and parameter names follow the PyTorch names, so that `mergejax.io.names` maps a checkpoint
to these pytrees by one generic rule ("layers.0.fc1.weight" -> layers_0/fc1/kernel, transposed).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's sigmoid approximation of GELU: `x * sigmoid(1.702 x)`."""
  return x * jax.nn.sigmoid(1.702 * x)


# Hugging Face `hidden_act` names. "gelu" in transformers is the exact erf form, not flax's default
# tanh approximation; getting this wrong costs ~1e-3 of parity.
_ACTIVATIONS = {
  "quick_gelu": quick_gelu,
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "relu": jax.nn.relu,
  "silu": jax.nn.silu,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """Returns the activation called `name` in a Hugging Face config.

  Args:
    name: the config's `hidden_act`, e.g. "quick_gelu" or "gelu".

  Returns:
    An elementwise function.
  """
  if name not in _ACTIVATIONS:
    raise ValueError(f"Unsupported hidden_act {name!r}; known: {sorted(_ACTIVATIONS)}.")
  return _ACTIVATIONS[name]


def dot_product_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None, num_heads: int
) -> jax.Array:
  """Multi-head attention on already projected `[batch, length, features]` inputs.

  Args:
    q: queries `[B, Lq, D]`.
    k: keys `[B, Lk, D]`.
    v: values `[B, Lk, D]`.
    bias: additive logits bias broadcastable to `[B, heads, Lq, Lk]` (masks), or None.
    num_heads: number of heads; D must divide evenly.

  Returns:
    `[B, Lq, D]` attention output (heads concatenated), in q's dtype.
  """
  b, lq, d = q.shape
  hd = d // num_heads
  split = lambda x: x.reshape(x.shape[0], x.shape[1], num_heads, hd)
  # Scale q·k after the product, as transformers does, and take the softmax in fp32 so that bf16
  # evaluation keeps stable normalisation.
  logits = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) * (hd**-0.5)
  logits = logits.astype(jnp.float32)
  if bias is not None:
    logits = logits + bias
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bhqk,bkhd->bqhd", weights, split(v))
  return out.reshape(b, lq, d)
