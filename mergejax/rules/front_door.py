"""`merge`: the validated, jit-cached front door to every registered rule.

One linear story: look up the rule's spec and validate the hyper-parameters; validate the inputs;
pick the leaves to merge; run the rule's host pre-pass where one helps (exact selection in NumPy
on CPU); run the rule under a cached `jax.jit` whose scalar hyper-parameters are traced; put the
unmerged leaves back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax

from mergejax import selection
from mergejax import tree as tree_lib
from mergejax.rules import spec as spec_lib
from mergejax.rules.averaging import weight_average
from mergejax.rules.task_specific import SubsetTaskSpecific, TaskSpecificMerge
from mergejax.tree import Params

OTHERS = ("base", "average")
_CACHE_SIZE = 64  # Compiled merges kept (per rule, static options and pre-pass).


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _compiled(fn: Callable[..., Any], static_items: tuple[tuple[str, Any], ...], with_stats: bool):
  # Keyed on the rule function itself (re-registering a name with another function compiles
  # anew) and on the static options; scalars are traced, so sweeps reuse the executable.
  static = dict(static_items)
  if with_stats:
    return jax.jit(
      lambda base, experts, stats, traced: fn(base, experts, stats, **static, **traced)
    )
  return jax.jit(lambda base, experts, stats, traced: fn(base, experts, **static, **traced))


class _Selection:
  """The leaves a merge works on, and how to put the others back."""

  def __init__(self, base, experts, include, exclude, others):
    self.whole = include is None and exclude is None
    self.full_base, self.experts_in = base, experts
    if self.whole:
      self.base, self.experts = base, experts
      return
    predicate = tree_lib.path_predicate(include, exclude)
    self.flat_base = tree_lib.flatten(base)
    self.flat_experts = [tree_lib.flatten(e) for e in experts]
    chosen = [p for p in self.flat_base if predicate(p)]
    if not chosen:
      raise ValueError(
        f"include={include!r}, exclude={exclude!r} select no leaf; paths look like "
        f"{list(self.flat_base)[:5]}."
      )
    # Flat {"a/b/c": leaf} dicts: their key paths spell the same "a/b/c" names, so per-leaf
    # PRNG keys and masks are those of a whole-tree merge.
    self.base = {p: self.flat_base[p] for p in chosen}
    self.experts = [{p: e[p] for p in chosen} for e in self.flat_experts]
    rest = {p: x for p, x in self.flat_base.items() if p not in self.base}
    if others == "average" and rest:
      rest = weight_average(rest, [{p: e[p] for p in rest} for e in self.flat_experts])
    self.rest = rest

  def reassemble(self, merged: Any) -> Any:
    if self.whole:
      return merged
    if isinstance(merged, TaskSpecificMerge):
      return SubsetTaskSpecific(inner=merged, rest=self.rest)
    out = [merged[p] if p in merged else self.rest[p] for p in self.flat_base]
    return jax.tree.unflatten(jax.tree.structure(self.full_base), out)


def merge(
  rule_name: str,
  base: Params,
  experts: Sequence[Params],
  *,
  include: str | Sequence[str] | None = None,
  exclude: str | Sequence[str] | None = None,
  others: str = "base",
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
    exclude: regex(es) of leaves not to merge (e.g. heads, normalization statistics).
    others: what unmerged leaves hold: "base" (θ0) or "average" (mean of the experts).
    check_finite: raise on NaN/Inf in any input (one device reduction per leaf).
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
  full = rule.validate(hparams, num_experts=len(experts))

  # 2. The inputs.
  tree_lib.check_compatible(base, experts)
  if check_finite:
    tree_lib.check_finite(base, name="base")
    for i, e in enumerate(experts):
      tree_lib.check_finite(e, name=f"experts[{i}]")

  # 3. The leaves to merge.
  part = _Selection(base, experts, include, exclude, others)

  # 4. Host pre-pass (e.g. TIES's exact thresholds in NumPy on CPU), then the jitted rule.
  static, traced = rule.split(full)
  stats = None
  if rule.prepare is not None and selection.prefer_host(part.base, part.experts):
    stats = rule.prepare(part.base, part.experts, **full)
  fn = rule.fn if stats is None else rule.with_stats
  if jit:
    run = _compiled(fn, tuple(sorted(static.items())), stats is not None)
    merged = run(part.base, part.experts, stats, traced)
  elif stats is None:
    merged = fn(part.base, part.experts, **static, **traced)
  else:
    merged = fn(part.base, part.experts, stats, **static, **traced)

  # 5. The unmerged leaves.
  return part.reassemble(merged)


def lower(rule_name: str, base: Params, experts: Sequence[Params], **hparams: Any):
  """Returns `jax.stages.Lowered` of the program `merge` runs (for compile-time and memory studies).

  Args:
    rule_name: a key of `REGISTRY`.
    base: pre-trained parameters θ0.
    experts: fine-tuned models θt.
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
  run = _compiled(fn, tuple(sorted(static.items())), stats is not None)
  return run.lower(base, list(experts), stats, traced)
