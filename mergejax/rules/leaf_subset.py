"""Which leaves a merge works on: `include` / `exclude` patterns (full matches of "a/b/c" leaf
paths, each of which must select something), integer and bool leaves (never merged arithmetically:
equal across the models by default, copied from θ0), and the reassembly of the merged leaves with
the others. Shared by `rules.merge` and the streaming engine.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from mergejax import tree as tree_lib
from mergejax.rules.averaging import weight_average
from mergejax.rules.task_specific import SubsetTaskSpecific, TaskSpecificMerge


def as_patterns(name: str, value: str | Sequence[str] | None) -> list[str] | None:
  """`include` / `exclude` as a list of validated regexes (None: no pattern)."""
  if value is None:
    return None
  patterns = [value] if isinstance(value, str) else list(value)
  for p in patterns:
    if not isinstance(p, str):
      raise TypeError(f"{name}: {p!r} is a {type(p).__name__}, not a regex string.")
    try:
      re.compile(p)
    except re.error as e:
      raise ValueError(f"{name}: {p!r} is not a valid regex ({e}).") from None
  return patterns or None


def check_patterns_match(name: str, patterns: list[str] | None, paths: list[str]) -> None:
  """A pattern that matches no leaf is a typo: fail, showing leaf paths that look alike."""
  for p in patterns or ():
    compiled = re.compile(p)
    if not any(compiled.fullmatch(path) for path in paths):
      close = difflib.get_close_matches(p, paths, n=3, cutoff=0.4)
      raise ValueError(
        f"{name} pattern {p!r} matches no leaf (patterns match whole '/'-separated paths). "
        f"Paths that look alike: {close}; some paths: {paths[:5]}."
      )


class LeafSubset:
  """The leaves a merge works on (as `base` / `experts`), and how to put the others back.

  The whole tree when no pattern is given and every leaf is floating; else flat
  {"a/b/c": leaf} dicts of the selected floating leaves, whose key paths spell the same names,
  so per-leaf keys and masks are those of a whole-tree merge. Unmerged floating leaves come from
  θ0 (`others="base"`) or the experts' mean (`"average"`); integer and bool leaves from θ0.
  """

  def __init__(self, base, experts, include, exclude, others, non_float):
    self.full_base = base
    self.flat_base = tree_lib.flatten(base)
    paths = list(self.flat_base)
    floats = {p for p, x in self.flat_base.items() if tree_lib.is_float(x)}
    self.whole = include is None and exclude is None and len(floats) == len(paths)
    self.cast_back = {
      p: x.dtype for p, x in self.flat_base.items() if p in floats and _narrowed(x.dtype)
    }
    if self.whole:
      self.base, self.experts = base, experts
      return
    check_patterns_match("include", include, paths)
    check_patterns_match("exclude", exclude, paths)
    predicate = tree_lib.path_predicate(include, exclude)
    chosen = [p for p in paths if p in floats and predicate(p)]
    if not chosen:
      raise ValueError(
        f"include={include!r}, exclude={exclude!r} select no floating leaf; paths look like "
        f"{paths[:5]}."
      )
    self.flat_experts = [tree_lib.flatten(e) for e in experts]
    check_non_float(self.flat_base, self.flat_experts, floats, non_float)
    # Flat {"a/b/c": leaf} dicts: their key paths spell the same "a/b/c" names, so per-leaf
    # PRNG keys and masks are those of a whole-tree merge.
    self.base = {p: self.flat_base[p] for p in chosen}
    self.experts = [{p: e[p] for p in chosen} for e in self.flat_experts]
    rest = {p: x for p, x in self.flat_base.items() if p not in self.base}
    average = {p: x for p, x in rest.items() if p in floats} if others == "average" else {}
    if average:
      rest.update(weight_average(average, [{p: e[p] for p in average} for e in self.flat_experts]))
    self.rest = rest

  def rest_inputs(self) -> tuple[dict, list[dict]]:
    """The unmerged floating leaves of every model (checked for NaN/Inf like merged ones)."""
    if self.whole:
      return {}, []
    paths = [p for p in self.rest if tree_lib.is_float(self.flat_base[p])]
    experts = [{p: e[p] for p in paths} for e in self.flat_experts]
    return {p: self.flat_base[p] for p in paths}, experts

  def reassemble(self, merged: Any) -> Any:
    if isinstance(merged, TaskSpecificMerge):
      return merged if self.whole else SubsetTaskSpecific(inner=merged, rest=self.rest)
    if self.cast_back:  # float64 leaves were merged in float32 (jax x64 off): restore the dtype.
      flat = tree_lib.flatten(merged)
      for p, dtype in self.cast_back.items():
        if p in flat:
          flat[p] = np.asarray(flat[p]).astype(dtype)
      merged = (
        flat
        if not self.whole
        else jax.tree.unflatten(jax.tree.structure(merged), list(flat.values()))
      )
    if self.whole:
      return merged
    out = [merged[p] if p in merged else self.rest[p] for p in self.flat_base]
    return jax.tree.unflatten(jax.tree.structure(self.full_base), out)


def _narrowed(dtype: Any) -> bool:
  return np.dtype(dtype) != np.dtype(jax.dtypes.canonicalize_dtype(dtype))


def check_non_float(flat_base, flat_experts, floats, non_float) -> None:
  """Integer and bool leaves are copied from θ0; by default they must agree across models."""
  if non_float == "base":
    return
  for path, b in flat_base.items():
    if path in floats:
      continue
    b = np.asarray(b)
    for i, e in enumerate(flat_experts):
      x = np.asarray(e[path])
      if not np.array_equal(b, x):
        where = np.argwhere(b != x)
        first = tuple(int(j) for j in where[0]) if where.size else ()
        raise ValueError(
          f"Leaf {path!r} ({b.dtype}) differs between base and experts[{i}] ({len(where)} "
          f"entries, first at {first}: {b[first]} vs {x[first]}). Integer and bool leaves are "
          "never merged arithmetically: make them equal, exclude nothing but fix the inputs, or "
          "pass non_float='base' to copy the base's values."
        )
