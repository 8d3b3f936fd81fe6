"""The streaming engine's statistics passes: whole-model sums round by round, and the speculative
pass that merges the leaves while it sums (rules whose sums are only asked for their sign)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from mergejax.distributed import hosts
from mergejax.streaming import compiling, flat
from mergejax.streaming.programs import _dependencies, _program


def sum_rounds(engine: Any, needs: list[set[int]]) -> None:
  """Fills `engine.totals` with the whole-model sums, one pass over the leaves per round (a sum
  whose partials need other sums waits for them).

  Args:
    engine: a `StreamingMerge`.
    needs: for each sum, the sums its partials depend on.
  """
  while len(engine.totals) < engine.num_totals:
    ready = [
      j
      for j in range(engine.num_totals)
      if j not in engine.totals and needs[j] <= set(engine.totals)
    ]
    if not ready:
      raise RuntimeError(f"{engine.rule.name}: whole-model sums depend on each other in a cycle.")
    values = [engine.totals.get(j, np.float32(0)) for j in range(engine.num_totals)]
    partials = []
    for path in sum_order(engine):
      compiled, _ = engine._executable(path, "totals")
      args = engine._args([path], engine._leaf_stats(path), values)
      partials.append([hosts.to_host(p) for p in compiled(*args)[0]])
    engine.totals.update({j: _in_order(leaf[j] for leaf in partials) for j in ready})
    engine.timings.stats_passes += 1


def sum_order(engine: Any) -> list[str]:
  """The order `rules.merge` adds the leaves' partials in: that of a flat `{path: leaf}` dict's
  leaves (sorted paths; a nested tree's order where no path's name sorts below "/")."""
  return sorted(engine.merged_paths)


def needs_of_totals(engine: Any) -> list[set[int]]:
  """For each whole-model sum, the sums its partials depend on (from the rule's jaxpr).

  Args:
    engine: a `StreamingMerge` whose sums are counted.

  Returns:
    One set of sum indices per sum.
  """
  fn, with_stats = engine._fn()
  program = _program(fn, engine.static, with_stats, False, "totals", None)
  path = engine.merged_paths[0]
  args = engine._args([path], engine._leaf_stats(path), [0.0] * engine.num_totals)
  n_in = len(jax.tree.leaves(args))
  total_inputs = list(range(n_in - engine.num_totals, n_in))
  with compiling.tracing(engine):
    deps = _dependencies(program, args)[: engine.num_totals]  # The partials (then the flags).
  return [{total_inputs.index(i) for i in d if i in total_inputs} for d in deps]


def can_speculate(sign_totals: list[bool], needs: list[set[int]]) -> bool:
  """Whether `speculative_pass` finds every sum in one pass: there are sign sums
  (`leafwise.total_is_negative`), they need no other sum, and the other sums need only them."""
  signs = {j for j, s in enumerate(sign_totals) if s}
  return bool(signs) and all(
    not needs[j] if j in signs else needs[j] <= signs for j in range(len(needs))
  )


def _in_order(values) -> np.float32:
  total = np.float32(0)
  for v in values:  # float32 adds, one leaf after the other.
    total = np.float32(total + np.float32(v))
  return total


def speculative_pass(engine: Any) -> None:
  """Finds every whole-model sum in one pass, guessing that no sign sum is negative
  (the sums given are zeros); merges each leaf in the same pass when every sum is a sign sum
  (`programs._program`'s "speculate" mode), else sums with the "totals" program (a sum over a
  leaf in a program that also merges it may round differently from a whole-tree call's).

  Where a guess was wrong, a leaf's results are right unless its `relevant` flag for that sum is
  set: those leaves' partials of the sums that need the signs are computed again with the true
  signs (EMR's masked sums), and their merged results are not kept. Results are kept in
  `engine.speculated`, up to the budget left beside the largest working set; the apply pass
  merges only the other leaves, with the same bits as a merge that knew the sums from the start.

  Args:
    engine: a `StreamingMerge` with `can_speculate(engine.sign_totals, engine.needs)`.
  """
  n, paths = engine.num_totals, sum_order(engine)
  sign = np.array(engine.sign_totals)
  keep_outputs = engine.apply_mode == "speculate"
  room = engine.budget - max(engine.working_set.values())
  partials: dict[str, list[np.float32]] = {}
  relevant: dict[str, np.ndarray] = {}
  kept: dict[str, tuple[Any, Any]] = {}
  for path in paths:
    if keep_outputs and path in engine.flat_paths:  # Its chunks' speculative programs.
      pending = flat.Pending(engine, path, [np.float32(0)] * n)
      partials[path], flags = pending.sums()
      relevant[path] = np.array(flags)
      size = int(np.size(engine.base[path])) * engine.output_dtype(path).itemsize
      if size * engine.num_outputs <= room:
        room -= size * engine.num_outputs
        kept[path] = pending
      continue
    compiled, _ = engine._executable(path, "speculate" if keep_outputs else "totals")
    args = engine._args([path], engine._leaf_stats(path), [np.float32(0)] * n)
    out, report, leaf_partials, leaf_relevant = (
      compiled(*args) if keep_outputs else (None, None, *compiled(*args))
    )
    partials[path] = [np.float32(hosts.to_host(p)) for p in leaf_partials]
    relevant[path] = np.array([r is not None and bool(hosts.to_host(r)) for r in leaf_relevant])
    if keep_outputs and (size := sum(x.nbytes for x in jax.tree.leaves(out))) <= room:
      room -= size
      kept[path] = (out, report)
  signs = {j: _in_order(partials[p][j] for p in paths) for j in np.flatnonzero(sign)}
  wrong = np.array([j in signs and signs[j] < 0 for j in range(n)])
  redo = [p for p in paths if (relevant[p] & wrong).any()]
  if redo and not keep_outputs:  # Sums that need the signs: those leaves' partials again.
    values = [signs.get(j, np.float32(0)) for j in range(n)]
    for path in redo:
      compiled, _ = engine._executable(path, "totals")
      leaf_partials, _ = compiled(*engine._args([path], engine._leaf_stats(path), values))
      for j in np.flatnonzero(~sign):
        partials[path][j] = np.float32(hosts.to_host(leaf_partials[j]))
  engine.totals = {
    j: signs[j] if j in signs else _in_order(partials[p][j] for p in paths) for j in range(n)
  }
  engine.speculated = {p: v for p, v in kept.items() if p not in redo}
  engine.timings.stats_passes += 1
  engine.timings.speculated = len(engine.speculated)
