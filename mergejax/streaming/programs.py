"""The streaming engine's parts below the merge: the memory budget, the compile cache, lazy
output leaves, and the per-leaf programs (one executable per distinct leaf signature)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.extend import core as jax_core

from mergejax import leafwise
from mergejax import tree as tree_lib
from mergejax.distributed import hosts
from mergejax.rules import front_door
from mergejax.rules.task_specific import TaskSpecificMerge

BUDGET_FRACTION = 0.5  # Default budget: this fraction of the memory available at the start.
_EXECUTABLES: dict[Any, Any] = {}  # Compiled per-leaf programs, shared by every merge.


def default_budget_bytes() -> int:
  """Half of MemAvailable (Linux), else of the physical memory."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(int(line.split()[1]) * 1024 * BUDGET_FRACTION)
  except OSError:
    pass
  return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * BUDGET_FRACTION)


def enable_compile_cache(directory: str) -> None:
  """Turns on JAX's persistent compilation cache in `directory` (every executable kept)."""
  jax.config.update("jax_compilation_cache_dir", str(directory))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@dataclasses.dataclass
class Timings:
  """What run.json records of a streaming merge."""

  executables: int = 0  # Compiled by this merge (the others came from the cache).
  compile_s: float = 0.0
  stats_passes: int = 0
  stats_s: float = 0.0
  speculated: int = 0  # Leaves merged in the statistics pass (`statistics.speculative_pass`).
  first_leaf_s: float | None = None  # From the constructor's start to the first output leaf.
  peak_working_set_bytes: int = 0
  groups: int = 0
  # On a mesh: how the per-leaf programs ran ("partitioned" / "gathered", `distributed.spmd`).
  spmd_modes: dict = dataclasses.field(
    default_factory=lambda: {"apply": set(), "statistics": set()}
  )


class LazyLeaf:
  """One output leaf: shape and dtype now, the values on `np.asarray` (computed then)."""

  def __init__(self, engine: Any, path: str, task: int, shape, dtype):  # A StreamingMerge.
    self._engine, self.path, self.task = engine, path, task
    self.shape, self.dtype = tuple(shape), np.dtype(dtype)
    self.ndim, self.size = len(self.shape), int(np.prod(self.shape))
    self.nbytes = self.size * self.dtype.itemsize

  def __array__(self, dtype=None, copy=None):
    out = self._engine.leaf(self.path, self.task)
    return out if dtype is None else out.astype(dtype)

  def pieces(self) -> list[np.ndarray]:
    """The flattened values as 1-D arrays to write one after the other (computed now)."""
    return self._engine.leaf_pieces(self.path, self.task)


def _copied_bytes(args) -> int:
  """Bytes of a program's arguments that XLA copies in: on CPU it reads a C-contiguous NumPy
  array in place when its data is 64-byte aligned (memory-mapped tensors as mergejax's writer
  lays them out: page cache, not working memory); device arrays are already there."""
  cpu = jax.default_backend() == "cpu"
  total = 0
  for x in jax.tree.leaves(args):
    if isinstance(x, jax.Array):
      continue
    if cpu and isinstance(x, np.ndarray) and x.flags.c_contiguous and x.ctypes.data % 64 == 0:
      continue
    total += int(np.size(x)) * np.dtype(x.dtype).itemsize
  return total


def _size(n: int) -> str:
  if n >= 2**30:
    return f"{n / 2**30:.2f} GiB"
  return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def _signature(args) -> tuple:
  leaves, treedef = jax.tree.flatten(args)
  return treedef, tuple((np.shape(x), np.dtype(x.dtype).str) for x in leaves)


def _abstract(args):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), args)


def _dependencies(fun, args) -> list[set[int]]:
  """For each flat output of `fun(*args)`, the flat inputs it depends on (from the jaxpr; an
  equation's outputs depend on all its inputs, which over-approximates and is safe)."""
  jaxpr = jax.make_jaxpr(fun)(*_abstract(args)).jaxpr
  deps: dict[Any, set[int]] = {v: {i} for i, v in enumerate(jaxpr.invars)}
  for eqn in jaxpr.eqns:
    used = set().union(*(deps.get(v, set()) for v in eqn.invars if isinstance(v, jax_core.Var)))
    for v in eqn.outvars:
      deps[v] = used
  return [deps.get(v, set()) if isinstance(v, jax_core.Var) else set() for v in jaxpr.outvars]


MODES = ("apply", "totals", "speculate")


def _program(fn, static, with_stats, check, mode, out_dtype):
  """The per-leaf program. `mode`: "apply": the merged leaf and its finite report; "totals": the
  partials of the whole-model sums and the leaf's `relevant` flags (`leafwise.total_is_negative`);
  "speculate": the merged leaf and its report, then the partials and flags. A task-specific
  result (EMR, TALL masks) gives the list of its task models, built in the program as
  `rules.merge`'s callers build them from its result (same bits: `task_specific.masked_apply`).
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")

  def run(base, experts, stats, traced, totals):
    with leafwise.substituting(totals) as ctx:
      args = (base, experts, stats) if with_stats else (base, experts)
      out = fn(*args, **static, **traced)
    # The sums in a program of their own: beside the merge, XLA may sum a leaf in another order
    # (EMR's sums taken in the merging program gave 211 entries unlike those of a mesh's run).
    if mode == "totals":
      return ctx.partials, ctx.relevant
    if mode == "speculate":
      return (*merged(out, base, experts), ctx.partials, ctx.relevant)
    return merged(out, base, experts)

  def merged(out, base, experts):
    def cast(tree):
      return jax.tree.map(lambda x: x if out_dtype is None else x.astype(out_dtype), tree)

    if isinstance(out, TaskSpecificMerge):  # Built here: eight models cost 1.7 s eagerly.
      models = [cast(out.task_model(base, t)) for t in range(out.num_tasks)]
      inputs = [front_door._finite_report(t) for t in (base, *experts)]
      return models, (
        jnp.concatenate([front_door._finite_report(models), *inputs]) if check else None
      )
    report = None
    if check:
      out = front_door._poison(out, base, experts)
      report = front_door._finite_report(out)
    return cast(out), report

  return run


def warn_in_memory(reason: str, base, paths, num_experts: int, budget: int) -> None:
  """Warns, before an in-memory fallback merge, when it needs more than the budget: at least
  the inputs in float32 and the output."""
  need = 4 * sum(int(np.size(base[p])) for p in paths) * (num_experts + 2)
  if need > budget:
    logging.warning(
      "%s; merging in memory needs at least %s, above the memory budget of %s.",
      reason,
      _size(need),
      _size(budget),
    )


def check_outputs(path: str, base, experts, models, report) -> None:
  """Raises, naming the leaf (and the expert, if an input is not finite), when a streamed leaf's
  finite check (`report`, fused into its merge) failed."""
  if np.isfinite(hosts.to_host(report)).all():
    return
  front_door._check_inputs({path: base[path]}, [{path: e[path]} for e in experts])
  for m in models:
    tree_lib.check_finite(
      {path: m["x"]},
      name="the merged model",
      hint="the inputs are finite, so the hyper-parameters make the merge overflow",
    )


def merge_in_memory(engine: Any) -> int:
  """A `StreamingMerge`'s fallback for rules that cannot stream: `rules.merge` on the merged
  leaves, the outputs put in its cache; returns the number of outputs."""
  warn_in_memory(
    engine.reason, engine.base, engine.merged_paths, len(engine.experts), engine.budget
  )
  base = {p: engine.base[p] for p in engine.merged_paths}
  experts = [{p: e[p] for p in engine.merged_paths} for e in engine.experts]
  merged = front_door.merge(
    engine.rule.name, base, experts, check_finite=engine.check, mesh=engine.layout, **engine.full
  )
  if isinstance(merged, TaskSpecificMerge):
    merged = jax.tree.map(hosts.to_host, merged)  # Task models as one device builds them.
    results = [merged.task_model(base, t) for t in range(merged.num_tasks)]
  else:
    results = [merged]
  for t, r in enumerate(results):
    for p, x in r.items():
      x = hosts.to_host(x)
      engine._cache[(p, t)] = x if engine.out_dtype is None else x.astype(engine.out_dtype)
  return len(results)
