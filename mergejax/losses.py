"""Classification losses and metrics on logits: the one implementation fine-tuning, learned
merging and evaluation share.

Every function returns the mean over the batch, computed in float32 (a bf16 log-softmax loses too
much for an entropy or a cross-entropy).

>>> import jax.numpy as jnp
>>> logits = jnp.array([[2.0, 0.0], [0.0, 2.0]])
>>> float(accuracy(logits, jnp.array([0, 0])))
0.5
>>> round(float(entropy(jnp.zeros((1, 4)))), 4)  # Uniform over 4 classes: log 4.
1.3863
"""

import jax
import jax.numpy as jnp
import optax


def entropy(logits: jax.Array) -> jax.Array:
  """Mean Shannon entropy (nats) of `softmax(logits)`.

  Args:
    logits: `[batch, classes]`.

  Returns:
    Scalar float32.
  """
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.sum(jnp.exp(log_p) * log_p, axis=-1))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy against integer labels.

  Args:
    logits: `[batch, classes]`.
    labels: int `[batch]`.

  Returns:
    Scalar float32.
  """
  logits = logits.astype(jnp.float32)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of argmax predictions equal to `labels` (not differentiable; for evaluation).

  Args:
    logits: `[batch, classes]`.
    labels: int `[batch]`.

  Returns:
    Scalar float32.
  """
  return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
