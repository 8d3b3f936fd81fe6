"""`StreamingMerge`: any registered rule, one leaf at a time, within a memory budget (see the
package docstring)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np

from mergejax import lapack_threads, leafwise
from mergejax import tree as tree_lib
from mergejax.distributed import hosts
from mergejax.rules import front_door, leaf_subset
from mergejax.rules import spec as spec_lib
from mergejax.rules.averaging import weight_average
from mergejax.streaming import blocks, compiling, flat, statistics
from mergejax.streaming.programs import (
  _EXECUTABLES,
  LazyLeaf,
  Timings,
  _abstract,
  _dependencies,
  _program,
  check_outputs,
  default_budget_bytes,
  merge_in_memory,
)


class StreamingMerge:
  """A merge of flat `{path: leaf}` models, computed leaf by leaf on demand.

  Args:
    rule_name: a key of `rules.REGISTRY`.
    base: `{"a/b/c": array}` of θ0 (memory-mapped NumPy views are read only when needed).
    experts: one such dict per expert, with the paths, shapes and dtypes of `base`.
    hparams: the rule's hyper-parameters (a random rule's key included).
    include / exclude / others / non_float / check_finite: as for `rules.merge`.
    memory_budget: bytes of working memory at most (None: `default_budget_bytes()`).
    dtype: output dtype of the floating leaves (None: the base's).
    order: the order leaves will be asked for (groups are formed along it); default tree order.
    mesh: None (one device), a `jax.sharding.Mesh` or a `distributed.LeafSharding`: each
      group's leaves are split over its devices and every per-leaf program runs SPMD with the
      single-device bits (`distributed.spmd`); the budget is then per device.

  Raises:
    ValueError / TypeError / KeyError: as `rules.merge` does, and a leaf whose working set exceeds
      the budget (naming it, its working set and the budget), all before any output exists.
  """

  def __init__(
    self,
    rule_name: str,
    base: dict[str, Any],
    experts: Sequence[dict[str, Any]],
    hparams: dict[str, Any],
    *,
    include=None,
    exclude=None,
    others: str = "base",
    non_float: str = "check",
    check_finite: bool = True,
    memory_budget: int | None = None,
    dtype: Any = None,
    order: Sequence[str] | None = None,
    mesh: Any = None,
  ):
    started = time.perf_counter()
    self.timings = Timings()
    self._started = started
    self.rule = spec_lib.get(rule_name)
    if self.rule.data_dependent:
      raise ValueError(
        f"Rule {rule_name!r} is data-dependent (its statistics weigh whole layers): it merges in "
        "memory, with rules.merge(..., statistics=...) (from disk: config.engine='memory')."
      )
    self.experts, self.base = list(experts), dict(base)
    if not self.experts:
      raise ValueError("A merge needs at least one expert.")
    if others not in front_door.OTHERS or non_float not in front_door.NON_FLOAT:
      raise ValueError(
        f"others must be in {front_door.OTHERS}, non_float in {front_door.NON_FLOAT}."
      )
    self.full = self.rule.validate(hparams, num_experts=len(self.experts))
    tree_lib.check_compatible(self.base, self.experts)
    self.check, self.others, self.out_dtype = check_finite, others, dtype
    self.layout = front_door.as_layout(mesh)
    self.budget = default_budget_bytes() if memory_budget is None else int(memory_budget)
    self._select(
      leaf_subset.as_patterns("include", include),
      leaf_subset.as_patterns("exclude", exclude),
      non_float,
    )
    self.static, traced = self.rule.split(self.full)
    self.key = traced.pop("key", None)
    self.traced = traced
    self.num_outputs = 1
    # Per whole-model sum: whether it is asked only for its sign (set where the sums are counted).
    self.sign_totals: list[bool] | None = None
    self.reason = self._streamable()
    self._groups: dict[str, int] = {}
    self._cache: dict[tuple[str, int], np.ndarray] = {}
    self.speculated: dict[str, tuple[Any, Any]] = {}  # Leaves merged in the statistics pass.
    if self.reason is None:
      self._plan(list(order) if order is not None else list(self.base))
      self._statistics()
    else:  # Rules that cannot stream: `rules.merge` on the merged leaves.
      self.num_outputs = merge_in_memory(self)
      self.order = list(self.merged_paths)

  # ------------------------------------------------------------------------------ set-up
  def _select(self, include, exclude, non_float) -> None:
    paths = list(self.base)
    floats = {p for p, x in self.base.items() if tree_lib.is_float(x)}
    leaf_subset.check_patterns_match("include", include, paths)
    leaf_subset.check_patterns_match("exclude", exclude, paths)
    predicate = tree_lib.path_predicate(include, exclude)
    self.merged_paths = [p for p in paths if p in floats and predicate(p)]
    if not self.merged_paths:
      raise ValueError(f"include={include!r}, exclude={exclude!r} select no floating leaf.")
    whole = include is None and exclude is None and len(floats) == len(paths)
    if not whole:  # rules.merge merges a flat {path: leaf} dict then: its (sorted) leaf order.
      self.merged_paths.sort()
    leaf_subset.check_non_float(self.base, self.experts, floats, non_float)
    self.index = {p: i for i, p in enumerate(self.merged_paths)}
    self.rest_floats = [p for p in paths if p in floats and p not in self.index]

  def _args(self, paths: Sequence[str], stats=None, totals=(), rows=None):
    """The program's arguments for a tree of `paths` (one leaf: the canonical `{"x": leaf}`;
    `rows=(r0, r1)`: that block of its rows, see `blocks`)."""
    names = ["x"] if len(paths) == 1 else list(paths)
    pick = (lambda x: x) if rows is None else (lambda x: x[rows[0] : rows[1]])  # noqa: E731
    base = {n: pick(self.base[p]) for n, p in zip(names, paths, strict=True)}
    experts = [{n: pick(e[p]) for n, p in zip(names, paths, strict=True)} for e in self.experts]
    traced = dict(self.traced)
    if self.key is not None:
      traced["key"] = blocks.folded_keys(self, paths, rows)
    return base, experts, stats, traced, [np.float32(v) for v in totals]

  def _fn(self, flat: bool = False):  # `flat`: a flat chunk's program (with `leaf_stats`).
    if self.rule.stream_stats is not None or (flat and self.rule.leaf_stats is not None):
      return self.rule.with_stats, True
    return self.rule.fn, False

  def _streamable(self) -> str | None:
    """None if the rule streams; else why not (then the merge runs in memory)."""
    if self.rule.prepare is not None and self.rule.stream_stats is None:
      return f"{self.rule.name} has a whole-model pre-pass (prepare=) but no stream_stats= hook"
    fn, with_stats = self._fn()
    if with_stats or len(self.merged_paths) < 2:
      return None  # A stream_stats hook declares its rule leaf-local given the statistics.
    paths = self._probe_pair()
    self.num_totals = self._count_totals(paths[:1], None)
    program = _program(fn, self.static, False, False, "apply", None)
    args = self._args(paths, None, [0.0] * self.num_totals)
    try:
      with compiling.tracing(self):
        deps = _dependencies(lambda *a: program(*a)[0], args)
    except TypeError as e:  # E.g. a random rule using its key other than through sparsify.
      return f"{self.rule.name} cannot run on one leaf at a time ({e})"
    n_in = len(jax.tree.leaves(args[:2]))
    inputs_of = [set(range(i, n_in, 2)) for i in (0, 1)]  # Flat inputs of leaf 0, of leaf 1.
    for j, d in enumerate(deps):  # Outputs alternate leaf 0, leaf 1 (per part of the result).
      if d & inputs_of[1 - j % 2]:
        return (
          f"{self.rule.name}'s output leaf {paths[j % 2]!r} depends on leaf "
          f"{paths[1 - j % 2]!r} other than through leafwise.total sums"
        )
    return None

  def _probe_pair(self) -> list[str]:
    # Two leaves of different shapes where there are (a 2-D one first: row-wise rules show up).
    by_shape = {}
    for p in self.merged_paths:
      by_shape.setdefault(np.shape(self.base[p]), p)
    picked = sorted(by_shape.values(), key=lambda p: -np.ndim(self.base[p]))[:2]
    return sorted(picked if len(picked) == 2 else self.merged_paths[:2])

  def _count_totals(self, paths, stats) -> int:
    """How many whole-model sums the rule takes (the same on every leaf)."""
    fn, with_stats = self._fn()
    with leafwise.recording() as ctx, compiling.tracing(self):
      base, experts, stats, traced, _ = self._args(paths, stats)
      args = (base, experts, stats) if with_stats else (base, experts)
      jax.eval_shape(lambda a, t: fn(*a, **self.static, **t), args, traced)
    self.sign_totals = [r is not None for r in ctx.relevant]
    return len(ctx.partials)

  # ------------------------------------------------------------------------------ planning
  def _executable(self, path: str, mode: str, rows=None):
    args, _ = compiling.program_key(self, path, mode, rows)
    return self._executable_of(mode, args), args

  def _executable_of(self, mode: str, args, flat: bool = False):
    """The compiled program in `mode` for `args`' shapes and dtypes (compiled on first use;
    `flat`: a flat chunk's)."""
    key = compiling.key_of(self, mode, args, flat)
    if key not in _EXECUTABLES:
      start = time.perf_counter()
      _EXECUTABLES[key] = compiling.compile_program(self, mode, args, flat)
      self.timings.executables += 1
      self.timings.compile_s += time.perf_counter() - start
    executable = _EXECUTABLES[key]
    if self.layout is not None:
      self.timings.spmd_modes["statistics" if mode == "totals" else "apply"].add(executable.mode)
    return executable

  def programs_of(self, path: str, mode: str) -> list[tuple[Any, tuple]]:
    """`(args, key)` of each program merging `path` in `mode` (its flat chunks' or its own)."""
    if mode != "totals" and path in self.flat_paths:
      return flat.programs(self, path, mode)
    return [compiling.program_key(self, path, mode)]

  def _leaf_stats(self, path: str):
    return None if self._stats is None else self._stats(self.index[path])

  def _plan(self, order: list[str]) -> None:
    self._stats = None
    if self.rule.stream_stats is not None:
      self._stats = self._stream_stats()
    first = self.merged_paths[0]
    if self.sign_totals is None or self._stats is not None:  # Not counted yet, or with statistics.
      self.num_totals = self._count_totals([first], self._leaf_stats(first))
    # Sign sums (and sums that need only them) take one speculative pass (`statistics`).
    self.needs = statistics.needs_of_totals(self) if self.num_totals else []
    self.speculate = self.layout is None and statistics.can_speculate(self.sign_totals, self.needs)
    # Where every sum is a sign sum, the statistics pass merges too (and merges again where it
    # guessed wrong: the same program, given the true sums, computes what "apply" would).
    self.apply_mode = "speculate" if self.speculate and all(self.sign_totals) else "apply"
    self.order = [p for p in order if p in self.index]
    self.flat_paths = flat.candidates(self)  # Elementwise rules: leaves merged in flat chunks.
    self.working_set: dict[str, int] = {}
    self.row_blocks: dict[str, int] = {}  # Leaves merged in blocks of rows: rows per block.
    # The whole-model sums' own programs, unless the speculative pass merges as it sums.
    totals = ["totals"] if self.num_totals and self.apply_mode != "speculate" else []
    compiling.compile_ahead(self, [self.apply_mode, *totals])
    out = self._output_shapes(first)  # A task-specific rule's programs give its task models.
    self.task_specific = isinstance(out, list)
    self.num_outputs = len(out) if self.task_specific else 1
    for path in self.merged_paths:
      if path in self.flat_paths and (ws := flat.working_set(self, path)) <= self.budget:
        self.working_set[path] = ws
        continue
      self.flat_paths.discard(path)  # Whole, or in blocks of rows where need be.
      ws = self.leaf_working_set(path)
      # Above the budget, or with large temporaries where the rule allows: in blocks of rows.
      if (ws > self.budget or blocks.large_temporaries(self, path)) and (
        split := blocks.rows_per_block(self, path, ws)
      ):
        self.row_blocks[path], ws = split
      self.working_set[path] = ws
      if ws > self.budget:
        raise blocks.over_budget(self, path, ws)
    self.timings.peak_working_set_bytes = max(self.working_set.values())
    group, used = 0, 0
    for path in self.order:
      if used and used + self.working_set[path] > self.budget:
        group, used = group + 1, 0
      self._groups[path] = group
      used += self.working_set[path]
    self.group_paths: dict[int, list[str]] = {}
    for path, g in self._groups.items():
      self.group_paths.setdefault(g, []).append(path)
    self.timings.groups = len(self.group_paths)

  def _output_shapes(self, path: str):
    """The program's result on one leaf (or chunk) as shapes (task-specific: a list of models)."""
    args, flat = self.programs_of(path, self.apply_mode)[0][0], path in self.flat_paths
    compiled = self._executable_of(self.apply_mode, args, flat)
    if (info := getattr(compiled, "out_info", None)) is not None:
      return info[0]
    fn, with_stats = self._fn(flat)
    program = _program(fn, self.static, with_stats, False, "apply", None)
    return jax.eval_shape(lambda *a: program(*a)[0], *_abstract(args))

  def leaf_working_set(self, path: str, rows=None) -> int:
    """Bytes a leaf's (or a block of its rows') program holds: XLA's output and temporaries, and
    the inputs XLA copies in."""
    mode = self.apply_mode if rows is None else "apply"
    return compiling.program_bytes(*self._executable(path, mode, rows))

  def _leaves(self) -> Iterator[tuple[Any, list[Any]]]:
    for p in self.merged_paths:
      yield np.asarray(self.base[p]), [np.asarray(e[p]) for e in self.experts]

  def _stream_stats(self):
    start, passes, paths = time.perf_counter(), [], self.merged_paths

    def leaves():  # Passes that reach the last leaf are counted.
      yield from self._leaves()
      passes.append(1)

    sizes, hook = [int(np.size(self.base[p])) for p in paths], self.rule.stream_stats
    stats = hook(leaves, sizes, memory_budget=self.budget, paths=paths, **self.full)
    self.timings.stats_passes += len(passes)
    self.timings.stats_s += time.perf_counter() - start
    return stats

  def _statistics(self) -> None:
    """The whole-model sums, round by round (a sum whose partials need others waits for them)."""
    self.totals: dict[int, np.float32] = {}
    if not self.num_totals:
      return
    start = time.perf_counter()
    with self._blas():
      if self.speculate:
        statistics.speculative_pass(self)
      else:
        statistics.sum_rounds(self, self.needs)
    self.timings.stats_s += time.perf_counter() - start

  # ------------------------------------------------------------------------------ outputs
  def output_dtype(self, path: str):
    x = self.base[path]
    if self.out_dtype is not None and tree_lib.is_float(x):
      return np.dtype(self.out_dtype)
    return np.dtype(x.dtype)

  def lazy_outputs(self, task: int = 0) -> dict[str, LazyLeaf]:
    """`{path: LazyLeaf}` of output `task` (0 for rules with one output), every leaf included."""
    return {
      p: LazyLeaf(self, p, task, np.shape(x), self.output_dtype(p)) for p, x in self.base.items()
    }

  def leaf(self, path: str, task: int = 0) -> np.ndarray:
    """Output `task`'s leaf `path` as a NumPy array (computing its group if needed)."""
    out = self._take(path, task)
    return out.assemble() if isinstance(out, flat.Chunked) else out

  def leaf_pieces(self, path: str, task: int = 0) -> list[np.ndarray]:
    """Output `task`'s leaf `path` as 1-D arrays whose concatenation is the flattened leaf (a
    leaf merged in flat chunks: its chunks, not copied into one array)."""
    out = self._take(path, task)
    return out.chunks if isinstance(out, flat.Chunked) else [np.reshape(out, -1)]

  def _take(self, path: str, task: int):
    if path not in self.index:
      return self._unmerged(path)
    if (path, task) not in self._cache:
      if self.reason is not None:
        raise KeyError(path)
      self._run_group(self._groups[path])
    return self._cache.pop((path, task))

  def _unmerged(self, path: str) -> np.ndarray:
    x = self.base[path]
    if tree_lib.is_float(x):
      if self.check:
        front_door._check_inputs({path: x}, [{path: e[path]} for e in self.experts])
      if self.others == "average":
        x = weight_average({path: x}, [{path: e[path]} for e in self.experts])[path]
    x = np.asarray(x)
    return x if not tree_lib.is_float(x) else x.astype(self.output_dtype(path))

  def _blas(self):  # One BLAS thread under a LAPACK rule's executions (see lapack_threads).
    return lapack_threads.single_threaded_blas() if self.rule.lapack else contextlib.nullcontext()

  def _run_group(self, group: int) -> None:
    with self._blas():  # Its results are pulled (np.asarray) before it closes.
      self._run_group_now(group)

  def _run_group_now(self, group: int) -> None:
    self._cache = {k: v for k, v in self._cache.items() if self._groups.get(k[0]) == group}
    values = [self.totals[j] for j in range(self.num_totals)]
    pending = []
    for path in self.group_paths[group]:  # Dispatched together; XLA runs them as they come.
      if path in self.speculated:  # Merged in the statistics pass (whole or in flat chunks).
        pending.append((path, self.speculated.pop(path)))
        continue
      if path in self.row_blocks:
        self._cache[(path, 0)] = blocks.merge_in_blocks(self, path, values)
        continue
      if path in self.flat_paths:  # Its chunks dispatched now, taken below.
        pending.append((path, flat.Pending(self, path, values)))
        continue
      # The speculative program, given the true sums, computes what the apply program would.
      compiled, _ = self._executable(path, self.apply_mode)
      args = self._args([path], self._leaf_stats(path), values)
      pending.append((path, compiled(*args)[:2]))
    for path, result in pending:
      if isinstance(result, flat.Pending):
        for t, x in enumerate(result.take()):
          self._cache[(path, t)] = x
        continue
      out, report = result
      models = out if self.task_specific else [out]
      if self.check:
        check_outputs(path, self.base, self.experts, models, report)
      for t, m in enumerate(models):
        x = hosts.to_host(m["x"])
        want = self.output_dtype(path)
        self._cache[(path, t)] = x if x.dtype == want else x.astype(want)
    if self.timings.first_leaf_s is None:
      self.timings.first_leaf_s = time.perf_counter() - self._started
