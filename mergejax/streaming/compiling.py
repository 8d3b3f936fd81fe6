"""The streaming engine's executables: one per distinct program (rule, options, leaf shapes and
dtypes, mode), compiled once and shared by every leaf and every merge of the process."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from mergejax import host_call
from mergejax.distributed import spmd
from mergejax.streaming.programs import (
  _EXECUTABLES,
  _abstract,
  _copied_bytes,
  _program,
  _signature,
)

_THREADS = len(os.sched_getaffinity(0))
_MEMORY: dict[int, tuple[Any, Any]] = {}  # id(executable) -> (executable, its memory analysis).


def memory_analysis(executable: Any) -> Any:
  """XLA's memory analysis of an executable (or a sharded program's), asked once per executable:
  ~3 ms a call, which the engine made twice per leaf (1 s for 150 leaves and 10 programs)."""
  if id(executable) not in _MEMORY:
    analysis = getattr(executable, "compiled", executable).memory_analysis()
    _MEMORY[id(executable)] = (executable, analysis)  # Held: the id stays this executable's.
  return _MEMORY[id(executable)][1]


def program_bytes(executable: Any, args, *, copied: bool = True) -> int:
  """Bytes a program holds: XLA's output and temporaries, and (`copied`) the inputs XLA copies
  in (without XLA's accounting: three float32 copies of every input)."""
  mem = memory_analysis(executable)
  if mem is None:
    return 4 * 3 * sum(int(np.size(x)) for x in jax.tree.leaves(args[:2]))
  own = int(mem.output_size_in_bytes + mem.temp_size_in_bytes)
  return own + (_copied_bytes(args) if copied else 0)


def program_key(engine: Any, path: str, mode: str, rows=None) -> tuple[Any, tuple]:
  """The arguments of `path`'s program (a block of `rows` of it, if given) and its key in
  `_EXECUTABLES`.

  Args:
    engine: a `StreamingMerge`.
    path: a merged leaf.
    mode: one of `programs.MODES`.
    rows: None, or (first row, rows) of a block.

  Returns:
    `(args, key)`.
  """
  args = engine._args([path], engine._leaf_stats(path), [0.0] * engine.num_totals, rows)
  return args, key_of(engine, mode, args)


def key_of(engine: Any, mode: str, args, flat: bool = False) -> tuple:
  """The key in `_EXECUTABLES` of the engine's program in `mode` for `args`' shapes and dtypes
  (`flat`: a flat chunk's, `streaming.flat`)."""
  fn, with_stats = engine._fn(flat)
  static = tuple(sorted(engine.static.items()))
  key = (fn, static, with_stats, engine.check, mode, str(engine.out_dtype), _signature(args))
  return key + (engine.layout,)


def tracing(engine: Any) -> contextlib.AbstractContextManager[None]:
  """Where the engine traces its rule (its programs, and the probes that count its sums and
  check it is leaf-local): for the CPU alone (`host_call.lowering_for_cpu`: host branches only)
  when its programs run on one CPU device. Tracing both branches of Breadcrumbs' selections
  took 0.17 of the 0.27 s of its probes."""
  if engine.layout is None and jax.default_backend() == "cpu":
    return host_call.lowering_for_cpu()
  return contextlib.nullcontext()


def compile_program(engine: Any, mode: str, args, flat: bool = False) -> Any:
  """The engine's program in `mode` (`flat`: a flat chunk's), compiled for the shapes and dtypes
  of `args`."""
  fn, with_stats = engine._fn(flat)
  program = _program(fn, engine.static, with_stats, engine.check, mode, engine.out_dtype)
  if engine.layout is None:
    with tracing(engine):
      lowered = jax.jit(program).lower(*_abstract(args))
    return lowered.compile()
  # Split over the mesh; compiled for these shapes (mode chosen per program).
  sharded = spmd.shard_program(program, engine.layout, _abstract(args))
  sharded.compile(*_abstract(args))
  return sharded


def compile_ahead(engine: Any, modes: Sequence[str]) -> None:
  """Compiles the programs in `modes` of every merged leaf not compiled yet, in parallel threads.

  XLA compiles without holding the GIL, and a one-shot merge of a model with a few distinct leaf
  shapes spends much of its time compiling (22M x 8 fp32, 10 programs, CLI: DARE's compile
  1.39 -> 1.04 s on 2 cores). A mesh's programs trace under `selection.across_devices`, a
  thread-local state: they compile one by one, as the engine asks for them.
  """
  if engine.layout is not None:
    return
  pending = {}
  for mode in modes:
    for path in engine.merged_paths:
      flat = mode != "totals" and path in engine.flat_paths
      for args, key in engine.programs_of(path, mode):
        if key not in _EXECUTABLES:
          pending.setdefault(key, (mode, args, flat))
  if len(pending) < 2:
    return
  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(min(len(pending), _THREADS)) as pool:
    compiled = list(pool.map(lambda job: compile_program(engine, *job), pending.values()))
  _EXECUTABLES.update(zip(pending, compiled, strict=True))
  engine.timings.executables += len(pending)
  engine.timings.compile_s += time.perf_counter() - start
