"""Validation of the statistics data-dependent rules take (Fisher diagonals, Gram matrices).

A data-dependent rule (Fisher merging, RegMean, RegMean++) is a pure function of (base, experts,
statistics): `statistics` holds one entry per expert, a dict whose `kind` key ("fisher" or
"grams") is a tree of arrays keyed by leaf path, as `mergejax.statistics` computes them. The
checks here run on the host before the merge, so that a statistic that is missing, misshaped or
computed for another model fails with the leaf path and the fix, instead of a broadcasting error
(or a silent wrong merge) inside jit; `rules.merge` then checks the statistics it keeps for
NaN/Inf (unless `check_finite=False`).

>>> stats = [{"fisher": {"w": jnp.ones(2)}}]
>>> per_expert("fisher", stats, 1, kind="fisher", source="fisher_statistics")[0]["w"].shape
(2,)
>>> per_expert("fisher", stats, 2, kind="fisher", source="fisher_statistics")
Traceback (most recent call last):
...
ValueError: fisher: statistics has 1 entries; expected one per expert (2).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from mergejax import tree as tree_lib


def per_expert(
  rule: str, statistics: Any, num_experts: int, *, kind: str, source: str
) -> list[dict[str, Any]]:
  """Returns each expert's `kind` tree flattened to {"a/b/c": array}, after the common checks.

  Args:
    rule: the rule's name (for messages).
    statistics: the caller's statistics, one dict per expert.
    num_experts: T.
    kind: the key every entry must hold ("fisher" or "grams").
    source: the `mergejax.statistics` function that computes them (for messages).

  Returns:
    One flat dict per expert.

  Raises:
    TypeError / ValueError: naming the expert, the leaf and the fix.
  """
  if isinstance(statistics, Mapping) or not isinstance(statistics, Sequence):
    raise TypeError(
      f"{rule}: statistics must be a list with one entry per expert (from "
      f"mergejax.statistics.{source}), got a {type(statistics).__name__}."
    )
  if len(statistics) != num_experts:
    raise ValueError(
      f"{rule}: statistics has {len(statistics)} entries; expected one per expert ({num_experts})."
    )
  flats = []
  for t, entry in enumerate(statistics):
    if not isinstance(entry, Mapping) or kind not in entry:
      keys = sorted(entry) if isinstance(entry, Mapping) else type(entry).__name__
      raise ValueError(
        f"{rule}: statistics[{t}] holds {keys}; this rule needs {kind!r} (compute it with "
        f"mergejax.statistics.{source})."
      )
    flat = tree_lib.flatten(entry[kind])
    for path, leaf in flat.items():
      dtype = getattr(leaf, "dtype", None)
      if dtype is None or not np.issubdtype(np.dtype(dtype), np.floating):
        raise TypeError(
          f"{rule}: statistics[{t}][{kind!r}] leaf {path!r} is a {type(leaf).__name__}"
          f"{'' if dtype is None else f' of dtype {dtype}'}; expected a floating array."
        )
    flats.append(flat)
  return flats


def check_known(rule: str, flats: Sequence[dict[str, Any]], paths: set[str], kind: str) -> None:
  """Every statistic must name a leaf of the parameters (else they belong to another model)."""
  for t, flat in enumerate(flats):
    unknown = sorted(set(flat) - paths)
    if unknown:
      raise ValueError(
        f"{rule}: statistics[{t}][{kind!r}] has leaf path(s) {unknown[:5]} that the parameters "
        f"do not have (some parameter paths: {sorted(paths)[:5]}). Compute the statistics on "
        "the tree you merge (the same root: e.g. the backbone, not the whole model)."
      )


def kernel_split(shape: tuple[int, ...], d_in: int) -> int | None:
  """The number k of leading kernel axes whose product is the layer's input size d_in.

  A Dense kernel [d_in, d_out] has k = 1; a DenseGeneral kernel contracting several input axes
  (an attention output projection [heads, head_dim, d]) has k = 2. The smallest k ≥ 1 with
  ∏ shape[:k] = d_in and k < len(shape) is returned, None if there is none.

  Args:
    shape: the kernel's shape.
    d_in: the Gram matrix's size.

  Returns:
    k, or None.
  """
  for k in range(1, len(shape)):
    if math.prod(shape[:k]) == d_in:
      return k
  return None


def check_grams(
  rule: str, flats: Sequence[dict[str, Any]], selected: Mapping[str, Any], kind: str = "grams"
) -> list[str]:
  """Checks Gram matrices against the kernels they belong to; returns the selected paths.

  Args:
    rule: the rule's name.
    flats: each expert's flat {kernel path: Gram}.
    selected: the leaves being merged, {path: leaf}.
    kind: the statistics key (for messages).

  Returns:
    The paths, among `selected`, that have a Gram matrix (in `selected`'s order).
  """
  for t, flat in enumerate(flats[1:], start=1):
    if set(flat) != set(flats[0]):
      missing = sorted(set(flats[0]) ^ set(flat))
      raise ValueError(
        f"{rule}: statistics[{t}][{kind!r}] and statistics[0][{kind!r}] cover different layers "
        f"(first difference: {missing[0]!r}). Compute every expert's statistics on the same "
        "architecture."
      )
  paths = [p for p in selected if p in flats[0]]
  for path in paths:
    shape = tuple(np.shape(selected[path]))
    for t, flat in enumerate(flats):
      gram = np.shape(flat[path])
      if len(gram) != 2 or gram[0] != gram[1]:
        raise ValueError(
          f"{rule}: statistics[{t}][{kind!r}] leaf {path!r} has shape {gram}; a Gram matrix is "
          "square [d_in, d_in]."
        )
      if kernel_split(shape, gram[0]) is None:
        raise ValueError(
          f"{rule}: leaf {path!r} has shape {shape}, but its Gram matrix in statistics[{t}] is "
          f"{gram}: the kernel's leading axes must multiply to the layer's input size {gram[0]} "
          "(flax layout [d_in, ..., d_out]). Were the statistics computed for another model?"
        )
  if not paths:
    raise ValueError(
      f"{rule}: none of the merged leaves has a Gram matrix (the statistics cover "
      f"{sorted(flats[0])[:5]}); without one the rule would only average. Check include=/exclude="
      " and that the statistics were computed on the tree you merge."
    )
  return paths


def concrete_scalar(value: Any) -> float | None:
  """`value` as a Python float when it is concrete, None when it is traced."""
  if isinstance(value, jax.core.Tracer):
    return None
  return float(np.asarray(value))
