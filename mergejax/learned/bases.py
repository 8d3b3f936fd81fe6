"""Basis vectors for learned merging: what the coefficients scale.

`make_basis(base, experts, config.basis)` builds one vector per expert:

* "task_vectors": τt = θt − θ0 (AdaMerging, aTLAS).
* "ties_split": AdaMerging++'s basis (`ties_merging_split` in AdaMerging's reference code): trim
  each flattened τt to its top `density` by magnitude, elect the sign per entry over all tasks
  (TIES's mass election), and keep in each trimmed τt only the entries that agree with the elected
  sign. The vectors stay separate (one coefficient each); their plain sum is TIES's disjoint sum.
* "ties_trimmed": the trim alone, without the election (mergejax's AdaMerging++ basis before
  the reference was checked; kept to reproduce those results).
* "dare": DARE's random drop, survivors rescaled by 1/density.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mergejax import combine, sparsify
from mergejax import task_vectors as task_vectors_lib
from mergejax.tree import Params

BASES = ("task_vectors", "ties_split", "ties_trimmed", "dare")


def ties_split(vectors: Sequence[Params], density: float) -> list[Params]:
  """Trims each vector to its top `density`, then zeroes entries against the elected sign.

  Where every trimmed entry of a position is zero, no vector keeps anything there, so the
  election's tie rule never changes the result except at exact cancellations of non-zero entries.

  Args:
    vectors: task vectors τt.
    density: fraction kept by the trim (over each whole flattened vector, as in the reference).

  Returns:
    One vector per task: trimmed τt where its sign agrees with the elected sign, 0 elsewhere.
  """
  trimmed = sparsify.trim_top_fraction(vectors, density, scope="model")
  sign = combine.elect_sign(trimmed, election="mass")

  def agree(s, x):
    return jnp.where(jnp.where(s > 0, x > 0, x < 0), x, jnp.zeros_like(x))

  return [jax.tree.map(agree, sign, t) for t in trimmed]


def make_basis(
  base: Params, experts: Sequence[Params], basis: Mapping[str, Any], *, seed: int = 0
) -> list[Params]:
  """Builds the basis vectors named by `basis["name"]` (see the module docstring).

  Args:
    base: θ0.
    experts: fine-tuned parameters.
    basis: {"name": one of `BASES`, "density": fraction kept by the TIES trim (top-|τ| over the
      whole flattened task vector), or DARE's keep probability}.
    seed: DARE's PRNG seed (one key per expert and leaf path, see `sparsify.random_drop`).

  Returns:
    The basis, one vector per expert.
  """
  name = basis["name"]
  if name not in BASES:
    raise ValueError(f"Unknown basis {name!r}: use one of {BASES}.")
  vectors = task_vectors_lib.task_vectors(base, experts)
  if name == "task_vectors":
    return vectors
  if name == "ties_split":
    return ties_split(vectors, basis["density"])
  if name == "ties_trimmed":
    return sparsify.trim_top_fraction(vectors, basis["density"], scope="model")
  return sparsify.random_drop(vectors, jax.random.key(seed), basis["density"])
