"""Learned merging on the synthvision zoo: its `LearnProblem` and the views aTLAS's UFM needs.

Every task is read out by its own frozen prototype head (`Zoo.apply_fn`), like CLIP's text heads;
the experts' validation accuracies are the normalized-accuracy reference for selection.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from mergejax import learned
from mergejax.benchmarks.synthvision import zoo as zoo_lib

# The strong view: label-preserving for every task. Flips and rotations are not (they change
# an orientation bin, a left/right relation, a letter), so the view is a one-pixel roll (counts,
# relations, shapes and textures survive a shift), a contrast jitter, pixel noise and erased
# pixels.
STRONG_NOISE = 0.1
STRONG_ERASE = 0.1
STRONG_CONTRAST = (0.8, 1.2)


def augment(key: jax.Array, x: jax.Array, view: str) -> jax.Array:
  """The synthvision views of a batch `x` [n, H, W, 3] of float images in [-0.5, 0.5].

  "weak" is the image itself (the reference's weak view is the un-augmented image); "strong"
  rolls each image by up to one pixel along each axis, scales its contrast by U(0.8, 1.2), adds
  Gaussian noise (σ = 0.1) and replaces 10% of the pixels by the image's mean colour.

  Args:
    key: PRNG key.
    x: images.
    view: "weak" or "strong".

  Returns:
    The augmented images, shaped like `x`, clipped to [-0.5, 0.5].
  """
  if view == "weak":
    return x
  if view != "strong":
    raise ValueError(f"Unknown view {view!r}; use 'weak' or 'strong'.")
  k_shift, k_contrast, k_noise, k_erase = jax.random.split(key, 4)
  n = x.shape[0]
  shifts = jax.random.randint(k_shift, (n, 2), -1, 2)
  x = jax.vmap(lambda img, s: jnp.roll(img, (s[0], s[1]), axis=(0, 1)))(x, shifts)
  mean = jnp.mean(x, axis=(1, 2), keepdims=True)
  contrast = jax.random.uniform(k_contrast, (n, 1, 1, 1), x.dtype, *STRONG_CONTRAST)
  x = mean + contrast * (x - mean) + STRONG_NOISE * jax.random.normal(k_noise, x.shape, x.dtype)
  erased = jax.random.bernoulli(k_erase, STRONG_ERASE, x.shape[:-1] + (1,))
  return jnp.clip(jnp.where(erased, mean, x), -0.5, 0.5)


def problem(
  zoo: zoo_lib.Zoo, mode: str, expert_val: Sequence[float], apply_fn=None
) -> learned.LearnProblem:
  """The merging problem of `mode`'s experts: frozen per-task heads, all three splits.

  Args:
    zoo: the zoo.
    mode: the experts' fine-tuning mode (also the forward pass: "linearized" is the Taylor model).
    expert_val: the experts' own validation accuracies (the selection reference).
    apply_fn: another zoo's `apply_fn(mode)` to use (one with the same heads and, for
      "linearized", the same θ0: every seed's zoo qualifies), so that compilations made for it
      can be reused; None: this zoo's.

  Returns:
    The `LearnProblem`.
  """
  return learned.LearnProblem(
    apply_fn=zoo.apply_fn(mode) if apply_fn is None else apply_fn,
    base=zoo.base,
    experts=zoo.experts[mode],
    splits=zoo.learned_splits(),
    reference_accuracy=[float(a) for a in expert_val],
    augment=augment,
  )
