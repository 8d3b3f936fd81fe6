"""`merge`: the validated, jit-cached front door to every registered rule.

One linear story: look up the rule's spec and validate the hyper-parameters; validate the inputs;
pick the leaves to merge (floating leaves the patterns select; integer and bool leaves are never
merged arithmetically: they must agree across the models and are copied from θ0); run the rule's
host pre-pass where one helps (exact selection in NumPy on CPU); run the rule under a cached
`jax.jit` whose scalar hyper-parameters are traced; put the unmerged leaves back.

The NaN/Inf checks ride along in the same jitted call instead of costing passes of their own:
each merged leaf is "poisoned" (set to NaN where any model's entry is not finite, an elementwise
term XLA fuses into the loop that reads the inputs anyway), and the call also returns each output
leaf's largest magnitude. Only when that is not finite does the host look closer, to name the
leaf and the model that holds the NaN or Inf, or the output leaf that overflowed.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mergejax import lapack_threads, selection
from mergejax import tree as tree_lib
from mergejax.rules import spec as spec_lib
from mergejax.rules.averaging import weight_average
from mergejax.rules.task_specific import SubsetTaskSpecific, TaskSpecificMerge
from mergejax.tree import Params

OTHERS = ("base", "average")
NON_FLOAT = ("check", "base")
_CACHE_SIZE = 64  # Compiled merges kept (per rule, static options, pre-pass and checks).


# ------------------------------------------------------------------------------ finite checks
def _max_abs(tree: Any) -> jax.Array:
  """Each floating leaf's largest |entry| (NaN if it holds a NaN), stacked in leaf order."""
  leaves = [x for x in jax.tree.leaves(tree) if tree_lib.is_float(x)]
  if not leaves:
    return jnp.zeros((0,), jnp.float32)
  # An empty leaf (TSV-C keeps no triplet of a [1, n] matrix) has nothing to check: 0.
  return jnp.stack(
    [jnp.max(jnp.abs(x)).astype(jnp.float32) if x.size else jnp.float32(0) for x in leaves]
  )


def _poison(merged: Params, base: Params, experts: Sequence[Params]) -> Params:
  """NaN where any input entry is NaN/Inf, the merged value elsewhere (bit for bit)."""

  def one(out, *inputs):
    if not tree_lib.is_float(out):
      return out
    # 0 * x is 0 for finite x and NaN for NaN/Inf: no overflow, no false alarm.
    flag = sum(jnp.zeros((), jnp.float32) * x.astype(jnp.float32) for x in inputs)
    return jnp.where(jnp.isnan(flag), jnp.asarray(jnp.nan, out.dtype), out)

  return jax.tree.map(one, merged, base, *experts)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _compiled(fn: Callable[..., Any], static_items: tuple, with_stats: bool, check: bool):
  # Keyed on the rule function itself (re-registering a name with another function compiles
  # anew), the static options, the pre-pass and the checks; scalars are traced, so sweeps reuse
  # the executable.
  return jax.jit(_checked(fn, dict(static_items), with_stats, check))


def _checked(fn: Callable[..., Any], static: dict, with_stats: bool, check: bool):
  def run(base, experts, stats, traced):
    args = (base, experts, stats) if with_stats else (base, experts)
    merged = fn(*args, **static, **traced)
    if not check:
      return merged, None
    if jax.tree.structure(merged) == jax.tree.structure(base):
      merged = _poison(merged, base, experts)
      return merged, (_max_abs(merged), None)
    # A task-specific result (EMR, TALL masks) is not shaped like the inputs: check them here.
    return merged, (_max_abs(merged), [_max_abs(t) for t in (base, *experts)])

  return run


def _raise_non_finite(merged: Any, report: Any, base: Params, experts: Sequence[Params]) -> None:
  """Host side of the checks: nothing to do unless a maximum is not finite."""
  out_max, in_max = jax.device_get(report)
  inputs_bad = in_max is not None and not all(np.isfinite(m).all() for m in in_max)
  if np.isfinite(out_max).all() and not inputs_bad:
    return
  # Name the input first (a NaN in, a NaN out), then the output leaf that overflowed.
  _check_inputs(base, experts)
  tree_lib.check_finite(
    merged,
    name="the merged model",
    hint="the inputs are finite, so the hyper-parameters make the merge overflow",
  )


# ------------------------------------------------------------------------------ leaf selection
def _as_patterns(name: str, value: str | Sequence[str] | None) -> list[str] | None:
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


def _check_patterns_match(name: str, patterns: list[str] | None, paths: list[str]) -> None:
  """A pattern that matches no leaf is a typo: fail, showing leaf paths that look alike."""
  for p in patterns or ():
    compiled = re.compile(p)
    if not any(compiled.fullmatch(path) for path in paths):
      close = difflib.get_close_matches(p, paths, n=3, cutoff=0.4)
      raise ValueError(
        f"{name} pattern {p!r} matches no leaf (patterns match whole '/'-separated paths). "
        f"Paths that look alike: {close}; some paths: {paths[:5]}."
      )


class _Selection:
  """The leaves a merge works on, and how to put the others back."""

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
    _check_patterns_match("include", include, paths)
    _check_patterns_match("exclude", exclude, paths)
    predicate = tree_lib.path_predicate(include, exclude)
    chosen = [p for p in paths if p in floats and predicate(p)]
    if not chosen:
      raise ValueError(
        f"include={include!r}, exclude={exclude!r} select no floating leaf; paths look like "
        f"{paths[:5]}."
      )
    self.flat_experts = [tree_lib.flatten(e) for e in experts]
    _check_non_float(self.flat_base, self.flat_experts, floats, non_float)
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


def _check_non_float(flat_base, flat_experts, floats, non_float) -> None:
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


# ------------------------------------------------------------------------------ the front door
def merge(
  rule_name: str,
  base: Params,
  experts: Sequence[Params],
  *,
  include: str | Sequence[str] | None = None,
  exclude: str | Sequence[str] | None = None,
  others: str = "base",
  non_float: str = "check",
  check_finite: bool = True,
  jit: bool = True,
  **hparams: Any,
) -> Any:
  """Validates the inputs and runs a registered rule (jit-compiled and cached).

  Scalars in `hparams` are passed as traced arrays, so a λ or density sweep compiles once.

  Args:
    rule_name: a key of `REGISTRY` (e.g. "ties").
    base: pre-trained parameters θ0.
    experts: fine-tuned models θt (structure, shapes and dtypes of `base`).
    include: regex(es) over "a/b/c" leaf paths to merge (full match); None merges every leaf.
      Each pattern must match some leaf (a typo fails instead of merging nothing).
    exclude: regex(es) of leaves not to merge (e.g. heads, normalization statistics).
    others: what unmerged floating leaves hold: "base" (θ0) or "average" (mean of the experts).
    non_float: integer and bool leaves are never merged; "check" requires them to be equal in
      every model and copies θ0's, "base" copies θ0's without checking.
    check_finite: raise if an input holds NaN/Inf (naming the leaf and the model) or if the
      merged model does (naming the leaf); checked inside the merge's own jitted pass.
    jit: run under `jax.jit` (cached per rule and static options).
    **hparams: the rule's keyword hyper-parameters (see `hparams_of(rule_name)`).

  Returns:
    Merged parameters with the structure and dtypes of `base`, or a `TaskSpecificMerge` (EMR,
    TALL masks) whose `task_model(base, t)` gives task t's model.

  Raises:
    KeyError / TypeError / ValueError: unknown rule or hyper-parameter, a value of the wrong type
      or out of range, mismatched trees (the message names the leaf path), non-finite values.
  """
  # 1. The rule and its hyper-parameters.
  rule = spec_lib.get(rule_name)
  experts = list(experts)
  if not experts:
    raise ValueError("merge() needs at least one expert.")
  if others not in OTHERS:
    raise ValueError(f"others must be one of {OTHERS}, got {others!r}.")
  if non_float not in NON_FLOAT:
    raise ValueError(f"non_float must be one of {NON_FLOAT}, got {non_float!r}.")
  full = rule.validate(hparams, num_experts=len(experts))

  # 2. The inputs, and 3. the leaves to merge.
  tree_lib.check_compatible(base, experts)
  part = _Selection(
    base,
    experts,
    _as_patterns("include", include),
    _as_patterns("exclude", exclude),
    others,
    non_float,
  )

  # 4. Host pre-pass (e.g. TIES's exact thresholds in NumPy on CPU), then the jitted rule.
  static, traced = rule.split(full)
  stats = None
  if rule.prepare is not None and selection.prefer_host(part.base, part.experts):
    try:
      stats = rule.prepare(part.base, part.experts, **full)
    except Exception:
      if check_finite:  # A NaN can break the pre-pass: say where it is rather than how it broke.
        _check_inputs(part.base, part.experts)
      raise
  fn = rule.fn if stats is None else rule.with_stats
  key = (fn, tuple(sorted(static.items())), stats is not None, check_finite)
  run = _compiled(*key) if jit else _checked(fn, static, stats is not None, check_finite)
  if rule.lapack:  # One BLAS thread under XLA's concurrent LAPACK calls (see lapack_threads).
    with lapack_threads.single_threaded_blas():
      merged, report = jax.block_until_ready(run(part.base, part.experts, stats, traced))
  else:
    merged, report = run(part.base, part.experts, stats, traced)

  # 5. The checks (unmerged leaves included), then the unmerged leaves.
  if check_finite:
    _raise_non_finite(merged, report, part.base, part.experts)
    rest_base, rest_experts = part.rest_inputs()
    if rest_base:
      _check_inputs(rest_base, rest_experts)
  return part.reassemble(merged)


def _check_inputs(base: Params, experts: Sequence[Params]) -> None:
  tree_lib.check_finite(base, name="base")
  for i, e in enumerate(experts):
    tree_lib.check_finite(e, name=f"experts[{i}]")


def lower(
  rule_name: str, base: Params, experts: Sequence[Params], *, check_finite: bool = True, **hparams
):
  """Returns `jax.stages.Lowered` of the program `merge` runs (for compile-time and memory studies).

  Args:
    rule_name: a key of `REGISTRY`.
    base: pre-trained parameters θ0.
    experts: fine-tuned models θt.
    check_finite: lower the program with the fused NaN/Inf checks (as `merge` runs by default).
    **hparams: the rule's hyper-parameters.

  Returns:
    The lowered computation; `.compile().memory_analysis()` gives XLA's buffer sizes.
  """
  rule = spec_lib.get(rule_name)
  full = rule.validate(hparams, num_experts=len(experts))
  static, traced = rule.split(full)
  stats = None
  if rule.prepare is not None and selection.prefer_host(base, experts):
    stats = rule.prepare(base, list(experts), **full)
  fn = rule.fn if stats is None else rule.with_stats
  run = _compiled(fn, tuple(sorted(static.items())), stats is not None, check_finite)
  return run.lower(base, list(experts), stats, traced)
