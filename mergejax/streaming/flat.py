"""Leaves of elementwise rules merged as chunks of their flattened entries, of a few padded sizes
(`leafwise.flat_pieces`): a few compiled programs for any set of leaf shapes, where the engine
otherwise compiles one per distinct shape.

For a one-shot merge compile time is most of the wall time: a ViT-S's 10 distinct leaf shapes
cost DARE-TIES 10 programs per mode (1.4 s of compile on 2 cores) where 2 chunk sizes cover every
leaf. The same bits as the whole leaf: each output entry reads only the same entry of the inputs
(the rule declares it, `RuleSpec.elementwise`; given its `RuleSpec.leaf_stats`, computed on the
host for the whole leaf and cut like the inputs: Breadcrumbs' masks, DELLA's rank spreads), random
rules draw the leaf's uniforms at the chunk's flat offset (`leafwise.FoldedKeys.offset`), and the
padding (zeros) is cut off. Rules whose sums are all signs run their chunks in the speculative
pass (`statistics.speculative_pass`), which adds the chunks' partials (signs exact unless a sum
is within rounding of zero, as there, where a leaf's program sums it). Leaves of
4 large chunks or more keep their whole-leaf program: a model has few such shapes, and chunks
would add calls and copies (each chunk's result is copied into the leaf) for little compile saved.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from typing import Any

import jax
import numpy as np

from mergejax import leafwise
from mergejax.distributed import hosts
from mergejax.streaming import blocks, compiling
from mergejax.streaming.programs import check_outputs


def applies(engine: Any) -> bool:
  """Whether the engine's rule, with these options, may merge leaves as flat chunks: it declares
  itself elementwise (given its whole-model sums and its `leaf_stats`, which are computed on the
  CPU's host only) and it runs on one device. Sums other than signs come from the whole leaves'
  "totals" programs (a chunk's partials would add up in another order; the "apply" programs are
  given the sums); sign sums may come from the chunks' speculative programs: the signs are
  exact unless the sum is within rounding of zero, as where a leaf's program sums it."""
  elementwise = engine.rule.elementwise
  host_stats = engine.rule.leaf_stats is None or jax.default_backend() == "cpu"
  return (
    elementwise is not None
    and bool(elementwise(engine.full))
    and engine.layout is None
    and host_stats
  )


# A rule with `leaf_stats` merges the leaves of a shape in flat chunks only up to this many
# entries over the shape's leaves and experts: its host statistics cost more per entry than the
# leaf's own program, which computes them in a host callback beside XLA (Breadcrumbs on the 32
# 512 x 2048 bf16 k/v projections x 8 experts of the full-size benchmark, in-process, warm: 0.84 s
# in chunks, 0.51-0.55 s whole), and pay where they save a compile (0.1-0.3 s a shape).
HOST_STATS_SHAPE_ENTRIES = 1 << 26


def candidates(engine: Any) -> set[str]:
  """The merged leaves to merge as flat chunks where they fit the budget: all below 4 large
  chunks (`leafwise.flat_chunk`), for a rule that `applies`; for a rule with `leaf_stats`, those
  of shapes with at most `HOST_STATS_SHAPE_ENTRIES` entries in all."""
  if not applies(engine):
    return set()
  small = 4 * leafwise.LARGE_CHUNK
  paths = [p for p in engine.merged_paths if int(np.size(engine.base[p])) < small]
  if engine.rule.leaf_stats is None:
    return set(paths)
  shapes = {p: np.shape(engine.base[p]) for p in paths}
  per_shape: dict[tuple, int] = {}
  for shape in shapes.values():
    per_shape[shape] = per_shape.get(shape, 0) + int(np.prod(shape)) * len(engine.experts)
  return {p for p in paths if per_shape[shapes[p]] <= HOST_STATS_SHAPE_ENTRIES}


def leaf_stats(engine: Any, path: str) -> list[dict[str, np.ndarray]] | None:
  """The rule's `leaf_stats` of the leaf (computed now, on the host), or None if it has none."""
  if engine.rule.leaf_stats is None:
    return None
  hook, experts = engine.rule.leaf_stats, [np.asarray(e[path]) for e in engine.experts]
  return hook(np.asarray(engine.base[path]), experts, **engine.full)


def _stats_dtype(engine: Any) -> np.dtype:
  """The dtype of the rule's `leaf_stats` (from a leaf of one zero of the first leaf's dtype:
  nothing read), found once."""
  if "_leaf_stats_dtype" not in engine.__dict__:
    path = engine.merged_paths[0]
    one = lambda x: np.zeros(1, x.dtype)  # noqa: E731
    probe = engine.rule.leaf_stats(
      one(engine.base[path]), [one(e[path]) for e in engine.experts], **engine.full
    )
    engine._leaf_stats_dtype = np.dtype(probe[0]["x"].dtype)
  return engine._leaf_stats_dtype


def piece_args(
  engine: Any, path: str, piece: tuple[int, int, int], totals=None, host=None, read=True
):
  """The program's arguments for one chunk `(start, entries, padded)` of the flattened leaf
  (zeros after its entries, up to `padded`), given the whole-model sums (None: zeros) and, for a
  rule with `leaf_stats`, the leaf's (`host`; None: zeros, for shapes). `read=False`: for shapes
  and layouts alone, a padded chunk's entries are zeros, not read (planning read the small
  leaves' pages of a cold full-size checkpoint at random: 1.1 s)."""
  start, length, padded = piece

  def cut(x):
    part = np.asarray(x).reshape(-1)[start : start + length]
    if length == padded:
      return part
    out = np.zeros(padded, part.dtype)
    if read:
      out[:length] = part
    return out

  base = {"x": cut(engine.base[path])}
  experts = [{"x": cut(e[path])} for e in engine.experts]
  traced = dict(engine.traced)
  if engine.key is not None:
    traced["key"] = leafwise.FoldedKeys(blocks.folded_keys(engine, [path]).data, np.uint32(start))
  if engine.rule.leaf_stats is None:
    stats = engine._leaf_stats(path)
  elif host is None:  # For shapes: zeros, one leaf per expert.
    stats = [{"x": np.zeros(padded, _stats_dtype(engine))} for _ in engine.experts]
  else:
    stats = [{"x": cut(h["x"])} for h in host]
  totals = [0.0] * engine.num_totals if totals is None else totals
  return base, experts, stats, traced, [np.float32(v) for v in totals]


def programs(engine: Any, path: str, mode: str) -> list[tuple[Any, tuple]]:
  """`(args, key)` of each distinct program the leaf's chunks run (`compiling.program_key`)."""
  found = {}
  for piece in leafwise.flat_pieces(int(np.size(engine.base[path]))):
    if piece[2] not in found:  # One per padded size: the arguments of its first chunk.
      args = piece_args(engine, path, piece, read=False)
      found[piece[2]] = (args, compiling.key_of(engine, mode, args, flat=True))
  return list(found.values())


def working_set(engine: Any, path: str) -> int:
  """Bytes the leaf's merge holds: every chunk's output and temporaries (all are dispatched
  before the first is taken) and the inputs XLA copies in, the padded chunk's inputs (our
  copies, which XLA may copy again: counted twice) and the output leaves (one per task of a
  task-specific rule) that `Chunked.assemble` makes where an array is asked for; and the rule's
  `leaf_stats` (one leaf per expert), their chunks counted as copied in by XLA."""
  n = int(np.size(engine.base[path]))
  total = n * engine.output_dtype(path).itemsize * engine.num_outputs
  with_stats = engine.rule.leaf_stats is not None
  if with_stats:
    total += _stats_dtype(engine).itemsize * n * len(engine.experts)
  for piece in leafwise.flat_pieces(n):
    args = piece_args(engine, path, piece, read=False)
    padded = piece[1] < piece[2]
    program = engine._executable_of(engine.apply_mode, args, flat=True)
    total += compiling.program_bytes(program, args[:2], copied=not padded)
    stats = sum(x.nbytes for x in jax.tree.leaves(args[2])) if with_stats else 0
    total += stats + (2 * sum(x.nbytes for x in jax.tree.leaves(args[:2])) if padded else 0)
  return total


@functools.cache
def _pool() -> concurrent.futures.ThreadPoolExecutor:
  """Threads that run the chunks' programs: XLA runs a small program in its caller's thread (no
  async dispatch), so one thread ran DARE-TIES's chunks one after the other (22M x 8 fp32,
  every leaf pulled: 0.30-0.32 -> 0.24 s with 2)."""
  return concurrent.futures.ThreadPoolExecutor(len(os.sched_getaffinity(0)))


class Pending:
  """A leaf whose chunks are dispatched (in the engine's `apply_mode`); `take()` waits for them
  and assembles the leaf, `sums()` gives the chunks' partial sums of a speculative program."""

  def __init__(self, engine: Any, path: str, totals):
    self.engine, self.path = engine, path
    self.pieces = []
    host = leaf_stats(engine, path)
    for piece in leafwise.flat_pieces(int(np.size(engine.base[path]))):
      args = piece_args(engine, path, piece, totals, host)
      program = engine._executable_of(engine.apply_mode, args, flat=True)
      self.pieces.append((piece, _pool().submit(lambda p=program, a=args: p(*a))))

  def sums(self) -> tuple[list[np.float32], list[bool]]:
    """The leaf's partials of the whole-model sums (its chunks' added in order) and its
    `relevant` flags (any chunk's), from a speculative program's results."""
    partials, relevant = None, None
    for _, future in self.pieces:
      chunk_partials, chunk_relevant = future.result()[2:]
      values = [np.float32(hosts.to_host(p)) for p in chunk_partials]
      flags = [r is not None and bool(hosts.to_host(r)) for r in chunk_relevant]
      if partials is None:
        partials, relevant = values, flags
        continue
      partials = [np.float32(a + b) for a, b in zip(partials, values, strict=True)]
      relevant = [a or b for a, b in zip(relevant, flags, strict=True)]
    return partials, relevant

  def take(self) -> list[Chunked]:
    """The merged leaf of each output (one, or one per task) as its chunks, after the leaf's
    finite check, if asked."""
    engine, path = self.engine, self.path
    shape = np.shape(engine.base[path])
    outs = [Chunked(shape, []) for _ in range(engine.num_outputs)]
    reports = []
    for (_, length, _), future in self.pieces:
      merged, report = future.result()[:2]
      for out, model in zip(outs, merged if engine.task_specific else [merged], strict=True):
        out.chunks.append(hosts.to_host(model["x"])[:length])
      reports.append(report)
    if engine.check:
      report = np.concatenate([np.ravel(hosts.to_host(r)) for r in reports])
      models = [{"x": out.assemble()} for out in outs] if not np.isfinite(report).all() else []
      check_outputs(path, engine.base, engine.experts, models, report)
    return outs


class Chunked:
  """An output leaf as its chunks' results (1-D, in order, padding cut off): a writer writes them
  one after the other (`pieces`), and `assemble` copies them into the leaf only where an array is
  asked for (copying 8 task models' chunks had cost TALL masks 0.7 s of a 2.3 s merge).

  Args:
    shape: the leaf's shape.
    chunks: its flattened entries, chunk by chunk.
  """

  def __init__(self, shape, chunks: list[np.ndarray]):
    self.shape, self.chunks = tuple(shape), chunks

  def assemble(self) -> np.ndarray:
    """The leaf as one array of its shape."""
    return np.concatenate(self.chunks).reshape(self.shape)
