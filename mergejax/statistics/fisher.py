"""The diagonal Fisher information of a classifier, from per-example gradients in JAX.

F = (1/N) Σn E_y [ (∂ log p(y | xn; θ) / ∂θ)² ], an array shaped like each parameter leaf, for
Fisher merging (`rules.fisher_merging`). Which y (`labels`):
* "expected" (default): the exact expectation over the model's predictive distribution,
  Σc p(c | xn) (∂ log p(c | xn) / ∂θ)², one backward pass per class and example: what Matena &
  Raffel's code computes (`_compute_exact_fisher_for_batch`, `expectation_wrt_logits=True`);
* "sampled": one y ~ p(· | xn) per example (an unbiased estimate of the same, one backward pass
  per example; needs `key`);
* "empirical": the dataset's labels y = yn (the "empirical Fisher").
Gradients are taken per example (`jax.vmap` over the batch of a `jax.vjp` of the model): the
squares are summed over examples, never the gradients. `per_example=False` instead squares the
gradient of the batch's summed objective, as FusionBench (and MergeLM) do: for "expected" that
objective is Σn Σc sqrt(p(c | xn)) log p(c | xn) with p held constant, for the others Σn log
p(yn | xn); the result then depends on the batch size (the cross terms of a batch's examples,
and for "expected" of its classes, are kept), which is why it is not the default.

Arithmetic is float32 whatever the parameters' dtype; the result is float32. Memory: per-example
gradients hold one float32 copy of the parameters per example of a batch (two for "expected"),
so batches of 8-32 suit models of tens of millions of parameters; the batch size does not change
the result beyond float rounding (`per_example=False` aside).

>>> import jax, jax.numpy as jnp
>>> apply_fn = lambda p, x: x @ p["w"]
>>> params = {"w": jnp.zeros((2, 3))}
>>> x = jnp.array([[1.0, 0.0], [0.0, 2.0]])
>>> stats = fisher_statistics(apply_fn, params, [x])
>>> # p = 1/3 each: Σc p_c (e_c − p)_j² = 2/9 per logit; F[i, j] = mean over examples of 2/9 x_i².
>>> bool(jnp.allclose(stats["fisher"]["w"], jnp.array([[1 / 9] * 3, [4 / 9] * 3])))
True
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from mergejax.statistics import batches as batches_lib
from mergejax.tree import Params

LABELS = ("expected", "sampled", "empirical")
_F32 = jnp.float32


def _logits(apply_fn: Callable[..., Any], params: Params, x: jax.Array) -> jax.Array:
  logits = apply_fn(params, x)
  if jnp.ndim(logits) != 2:
    raise ValueError(
      f"apply_fn(params, x) must return logits [batch, classes]; got shape {jnp.shape(logits)}."
    )
  return logits.astype(_F32)


def _squares(grads: Params) -> Params:
  return jax.tree.map(lambda g: jnp.square(g.astype(_F32)), grads)


def _one_example(apply_fn, labels, params, x, y, key):
  """The Fisher of one example (x without its batch axis)."""
  logits, vjp = jax.vjp(lambda p: _logits(apply_fn, p, x[None])[0], params)
  # d log p(c) / d logits = e_c − p; p enters only as a constant of the cotangent.
  probs = jax.nn.softmax(logits)
  num_classes = logits.shape[-1]
  if labels == "expected":

    def one_class(total, c):
      (grads,) = vjp(jax.nn.one_hot(c, num_classes, dtype=_F32) - probs)
      return jax.tree.map(
        lambda a, g: a + probs[c] * jnp.square(g.astype(_F32)), total, grads
      ), None

    zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), _F32), params)
    # A scan over classes: memory of one gradient per example, whatever the number of classes.
    return jax.lax.scan(one_class, zeros, jnp.arange(num_classes))[0]
  if labels == "sampled":
    y = jax.random.categorical(key, logits)
  (grads,) = vjp(jax.nn.one_hot(y, num_classes, dtype=_F32) - probs)
  return _squares(grads)


def _batch_fisher(apply_fn, labels, per_example, params, x, y, keys):
  """Σ over the batch's examples of their Fisher (or the batch-gradient form, see the module)."""
  if per_example:
    per = jax.vmap(functools.partial(_one_example, apply_fn, labels), in_axes=(None, 0, 0, 0))(
      params, x, y, keys
    )
    return jax.tree.map(lambda a: jnp.sum(a, axis=0), per)
  logits, vjp = jax.vjp(lambda p: _logits(apply_fn, p, x), params)
  probs = jax.nn.softmax(logits)
  if labels == "expected":
    # Gradient of Σn Σc w_nc log p_nc with w = sqrt(p) constant: w − p Σc w (FusionBench).
    w = jnp.sqrt(probs)
    cotangent = w - probs * jnp.sum(w, axis=-1, keepdims=True)
  else:
    if labels == "sampled":
      y = jax.vmap(jax.random.categorical)(keys, logits)
    cotangent = jax.nn.one_hot(y, logits.shape[-1], dtype=_F32) - probs
  (grads,) = vjp(cotangent)
  return _squares(grads)


@functools.lru_cache(maxsize=32)
def _jitted_step(apply_fn, labels, per_example):
  # One executable per (apply_fn, labels, per_example) and batch shape, shared by the calls for
  # every expert and batch (a fresh jax.jit per call would recompile each time).
  return jax.jit(functools.partial(_batch_fisher, apply_fn, labels, per_example))


def fisher_statistics(
  apply_fn: Callable[[Params, jax.Array], jax.Array],
  params: Params,
  batches: Iterable[Any],
  *,
  labels: str = "expected",
  per_example: bool = True,
  key: jax.Array | None = None,
  max_examples: int | None = None,
) -> dict[str, Params]:
  """Computes the diagonal Fisher of `apply_fn` at `params` over the given batches.

  Args:
    apply_fn: `logits = apply_fn(params, x)`, logits [batch, classes] (close over anything
      else: frozen heads, the task index, `module.apply`).
    params: the parameters to differentiate (e.g. the backbone you will merge); the Fisher has
      their structure.
    batches: an iterable of batches (see `mergejax.statistics.batches`); "empirical" needs
      labels y in them. Consumed once, in order.
    labels: "expected" (default), "sampled" or "empirical" (see the module docstring).
    per_example: square per-example gradients (default); False squares each batch's gradient
      (FusionBench / MergeLM).
    key: PRNG key for labels="sampled" (one key per batch, one per example within it, folded
      from this one).
    max_examples: stop before a batch once this many examples were used (FusionBench's Fisher
      merging uses 256 per task); None uses every batch.

  Returns:
    {"fisher": tree shaped like `params`, float32}, the mean over the examples used.
  """
  if labels not in LABELS:
    raise ValueError(f"labels must be one of {LABELS}, got {labels!r}.")
  if labels == "sampled" and key is None:
    raise ValueError("labels='sampled' draws labels: pass key=jax.random.key(seed).")
  step = _jitted_step(apply_fn, labels, per_example)
  total, count = None, 0
  for b, batch in enumerate(batches_lib.take(batches, max_examples)):
    x, y = batches_lib.unpack(batch)
    n = batches_lib.num_examples(batch)
    if labels == "empirical":
      if y is None:
        raise ValueError(
          f"labels='empirical' needs labels in every batch: batch {b} has none (pass (x, y) "
          "tuples or {'x': ..., 'y': ...} dicts)."
        )
      y = jnp.asarray(y, jnp.int32)
    else:
      y = jnp.zeros((n,), jnp.int32)  # Unused.
    keys = jax.random.split(jax.random.fold_in(key, b), n) if key is not None else None
    if keys is None:
      keys = jax.random.split(jax.random.key(0), n)  # Unused.
    fisher = step(params, jnp.asarray(x), y, keys)
    total = fisher if total is None else jax.tree.map(jnp.add, total, fisher)
    count += n
  if total is None:
    raise ValueError("fisher_statistics got no batch: pass at least one batch of examples.")
  return {"fisher": jax.tree.map(lambda f: f / count, total)}
