"""MGDA: the min-norm convex combination of per-task gradients (Sener & Koltun, 2018).

Given per-task gradients g_1..g_T, find α on the simplex minimizing ||Σ_t α_t g_t||². The
combined direction decreases every task's loss whenever such a direction exists (Désidéri's
multiple-gradient descent). Only the T×T Gram matrix is needed, so the solver costs nothing next
to the gradients themselves.

The solver is Frank-Wolfe with an exact line search, a fixed number of iterations under
`lax.fori_loop`, so it is pure and jit-compatible. With two tasks the first iteration is already
exact (the simplex is a segment and the line search solves it).
"""

import functools
import operator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp


def _segment_min(aa: jax.Array, ab: jax.Array, bb: jax.Array) -> jax.Array:
  """γ in [0, 1] minimizing ||(1 − γ) a + γ b||², from the three dot products."""
  denom = aa + bb - 2.0 * ab
  # Equal vectors (denom 0): every γ is optimal; keep the current point.
  safe = jnp.where(denom > 0, denom, 1.0)
  return jnp.where(denom > 0, jnp.clip((aa - ab) / safe, 0.0, 1.0), 0.0)


def min_norm_weights(gram: jax.Array, *, num_iterations: int = 100) -> jax.Array:
  """Returns α on the simplex minimizing αᵀ G α for a Gram matrix G.

  Args:
    gram: `[T, T]`, G[i, j] = <g_i, g_j>.
    num_iterations: Frank-Wolfe iterations (static).

  Returns:
    α, float32 `[T]`, non-negative, summing to 1.
  """
  gram = gram.astype(jnp.float32)
  num_tasks = gram.shape[0]
  alpha = jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32)

  def body(_, alpha):
    g_alpha = gram @ alpha
    vertex = jnp.argmin(g_alpha)  # Frank-Wolfe: the simplex vertex of steepest descent.
    gamma = _segment_min(alpha @ g_alpha, g_alpha[vertex], gram[vertex, vertex])
    return (1.0 - gamma) * alpha + gamma * jax.nn.one_hot(vertex, num_tasks, dtype=jnp.float32)

  return jax.lax.fori_loop(0, num_iterations, body, alpha)


def min_norm_combination(
  gradients: jax.Array | Sequence[jax.Array], *, num_iterations: int = 100
) -> tuple[jax.Array, jax.Array]:
  """Combines per-task gradients into the min-norm element of their convex hull.

  Args:
    gradients: `[T, ...]` array (or a sequence of T equally-shaped arrays), one gradient per task.
    num_iterations: Frank-Wolfe iterations.

  Returns:
    `(direction, alpha)`: Σ_t α_t g_t with the gradients' trailing shape, and α `[T]`.
  """
  grads = jnp.stack(list(gradients)) if not isinstance(gradients, jax.Array) else gradients
  return min_norm_combination_tree(grads, num_iterations=num_iterations)


def min_norm_combination_tree(stacked: Any, *, num_iterations: int = 100) -> tuple[Any, jax.Array]:
  """`min_norm_combination` for pytree gradients: every leaf has the leading task axis `[T, ...]`.

  The Gram matrix sums the per-leaf inner products, so the result is the one for the gradients
  flattened and concatenated, without building that concatenation.

  Args:
    stacked: a pytree of `[T, ...]` arrays (per-task gradients of any coefficient pytree).
    num_iterations: Frank-Wolfe iterations.

  Returns:
    `(direction, alpha)`: a pytree shaped like one task's gradient, and α `[T]`.
  """
  leaves = jax.tree.leaves(stacked)
  grams = []
  for leaf in leaves:
    flat = leaf.reshape(leaf.shape[0], -1).astype(jnp.float32)
    grams.append(flat @ flat.T)
  alpha = min_norm_weights(functools.reduce(operator.add, grams), num_iterations=num_iterations)
  direction = jax.tree.map(
    lambda g: jnp.tensordot(alpha, g.astype(jnp.float32), axes=1).astype(g.dtype), stacked
  )
  return direction, alpha
