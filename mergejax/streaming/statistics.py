"""The streaming engine's statistics passes: whole-model sums round by round, and the speculative
pass that merges the leaves while it sums (rules whose sums are only asked for their sign)."""

from __future__ import annotations

from typing import Any

import numpy as np

from mergejax.distributed import hosts


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
    acc = dict.fromkeys(ready, np.float32(0))
    for path in engine.merged_paths:  # The order a whole-tree call adds the leaves' sums in.
      compiled, _ = engine._executable(path, "totals")
      args = engine._args([path], engine._leaf_stats(path), values)
      partials = [hosts.to_host(p) for p in compiled(*args)]
      for j in ready:
        acc[j] = np.float32(acc[j] + np.float32(partials[j]))
    engine.totals.update(acc)
    engine.timings.stats_passes += 1


def speculative_pass(engine: Any) -> None:
  """Sums the rule's `leafwise.total_is_negative` partials and merges every leaf in the same pass,
  as if no sum were negative (`programs._program`'s "speculate" mode).

  A leaf's result is kept (in `engine.speculated`, up to the budget left beside the largest
  working set) unless a sum turns out negative and the leaf's result depends on it (its
  `relevant` flag for that sum); the apply pass then merges only the leaves not kept, with the
  same bits as a merge that knew the sums from the start.

  Args:
    engine: a `StreamingMerge` whose rule's sums are all signs (`leafwise.sign_only`).
  """
  zeros = [np.float32(0)] * engine.num_totals
  acc = [np.float32(0)] * engine.num_totals
  room = engine.budget - max(engine.working_set.values())
  kept: dict[str, tuple[Any, Any, np.ndarray]] = {}
  for path in engine.merged_paths:  # The order a whole-tree call adds the leaves' sums in.
    compiled, _ = engine._executable(path, "speculate")
    args = engine._args([path], engine._leaf_stats(path), zeros)
    out, report, partials, relevant = compiled(*args)
    for j, p in enumerate(partials):
      acc[j] = np.float32(acc[j] + np.float32(hosts.to_host(p)))
    size = int(np.size(out["x"])) * np.dtype(out["x"].dtype).itemsize
    if size <= room:
      room -= size
      kept[path] = (out["x"], report, np.array([bool(hosts.to_host(r)) for r in relevant]))
  engine.totals = dict(enumerate(acc))
  negative = np.array([t < 0 for t in acc])
  engine.speculated = {
    p: (x, report) for p, (x, report, relevant) in kept.items() if not (relevant & negative).any()
  }
  engine.timings.stats_passes += 1
  engine.timings.speculated = len(engine.speculated)
