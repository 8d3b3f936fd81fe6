"""Objectives for learned merging: `loss = objective(logits, batch)`, a scalar per task.

A batch is a dict with "x" and, for supervised objectives, integer labels "y". Every objective
returns the mean over the batch; the training loop sums the per-task values (or combines their
gradients with MGDA).

* "entropy": Shannon entropy of the softmax predictions (AdaMerging; unlabeled inputs).
* "cross_entropy": supervised, on labeled validation batches (aTLAS, DV-BASI supervised).
* "pseudo_label": FixMatch-style cross-entropy against the model's own argmax, counted only where
  its confidence reaches `threshold` (aTLAS unsupervised, threshold 0.99).
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

Batch = dict[str, jax.Array]


class Objective(NamedTuple):
  """A named loss. `needs_labels` tells the loop whether batches must carry "y"."""

  fn: Callable[[jax.Array, Batch], jax.Array]
  needs_labels: bool


def entropy(logits: jax.Array, batch: Batch | None = None) -> jax.Array:
  """Mean Shannon entropy (nats) of `softmax(logits)` over the batch.

  Args:
    logits: `[batch, classes]`.
    batch: unused; present so all objectives share one signature.

  Returns:
    Scalar float32.
  """
  del batch
  logits = logits.astype(jnp.float32)  # bf16 log-softmax loses too much for an entropy.
  log_p = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.sum(jnp.exp(log_p) * log_p, axis=-1))


def cross_entropy(logits: jax.Array, batch: Batch) -> jax.Array:
  """Mean softmax cross-entropy against integer labels `batch["y"]`.

  Args:
    logits: `[batch, classes]`.
    batch: must hold "y", int `[batch]`.

  Returns:
    Scalar float32.
  """
  logits = logits.astype(jnp.float32)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]))


def pseudo_label_cross_entropy(
  logits: jax.Array, batch: Batch | None = None, *, threshold: float = 0.99
) -> jax.Array:
  """FixMatch-style loss: CE against the argmax where max-probability >= `threshold`.

  The pseudo-labels and the mask are computed under `stop_gradient` (they are targets, not
  predictions). As in FixMatch the masked sum is divided by the batch size, not by the number of
  confident examples, so a batch with no confident example contributes zero loss and zero gradient.

  Args:
    logits: `[batch, classes]`.
    batch: unused.
    threshold: confidence needed for an example to count.

  Returns:
    Scalar float32.
  """
  del batch
  logits = logits.astype(jnp.float32)
  probs = jax.lax.stop_gradient(jax.nn.softmax(logits, axis=-1))
  labels = jnp.argmax(probs, axis=-1)
  mask = (jnp.max(probs, axis=-1) >= threshold).astype(jnp.float32)
  per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return jnp.sum(mask * per_example) / logits.shape[0]


def accuracy(logits: jax.Array, batch: Batch) -> jax.Array:
  """Fraction of correct argmax predictions (not differentiable; for evaluation).

  Args:
    logits: `[batch, classes]`.
    batch: must hold "y".

  Returns:
    Scalar float32.
  """
  return jnp.mean((jnp.argmax(logits, axis=-1) == batch["y"]).astype(jnp.float32))


def get_objective(name: str, **kwargs: Any) -> Objective:
  """Resolves an objective by name.

  Equal arguments give the identical (cached) object, so jitted steps built on it are reused.

  Args:
    name: "entropy", "cross_entropy" or "pseudo_label".
    **kwargs: options of that objective (`threshold` for "pseudo_label"); unknown ones raise.

  Returns:
    The `Objective`.
  """
  return _get_objective(name, tuple(sorted(kwargs.items())))


@functools.lru_cache(maxsize=16)
def _get_objective(name: str, items: tuple[tuple[str, Any], ...]) -> Objective:
  kwargs = dict(items)
  if name == "entropy":
    _no_kwargs(name, kwargs)
    return Objective(entropy, needs_labels=False)
  if name == "cross_entropy":
    _no_kwargs(name, kwargs)
    return Objective(cross_entropy, needs_labels=True)
  if name == "pseudo_label":
    threshold = float(kwargs.pop("threshold", 0.99))
    _no_kwargs(name, kwargs)
    return Objective(
      lambda logits, batch: pseudo_label_cross_entropy(logits, batch, threshold=threshold),
      needs_labels=False,
    )
  raise ValueError(f"Unknown objective {name!r}: use entropy, cross_entropy or pseudo_label.")


def _no_kwargs(name: str, kwargs: dict[str, Any]) -> None:
  if kwargs:
    raise ValueError(f"Objective {name!r} takes no options, got {sorted(kwargs)}.")
