"""Leaves above the memory budget merged in blocks of rows (slices along axis 0), for rules that
declare each output row reads only the same input rows (`RuleSpec.row_split`): e.g. Breadcrumbs'
per-row program on a 128256 x 2048 embedding with 8 experts, which a 2 GB budget cannot hold whole.

The same bits as the whole leaf: the rule's per-row and elementwise arithmetic does not change,
random rules draw the leaf's uniforms at the block's flat offset (`leafwise.FoldedKeys.offset`),
and leaves are never split for rules with whole-model sums (a leaf's partial sum would be added in
another order) or on a mesh.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from mergejax import leafwise, sparsify
from mergejax.distributed import hosts
from mergejax.streaming import compiling
from mergejax.streaming.programs import _size, check_outputs

# A leaf whose program holds temporaries above this is merged in blocks of rows of at most this
# even within the budget, where its rule allows: XLA:CPU programs with GB-sized temporaries ran
# up to 3x slower per entry (Breadcrumbs' |τ| rows for its host sorts, 128256 x 2048 embedding,
# 8 experts, 2 GB budget: 51 s in blocks of 1.6 GB, 17-21 s in blocks of 256 MB: fresh pages
# at every call). Elementwise rules' programs (no temporaries) stay whole.
SPLIT_ABOVE = 256 << 20


def large_temporaries(engine: Any, path: str) -> bool:
  """Whether the leaf's program holds more than SPLIT_ABOVE of XLA temporaries."""
  compiled, _ = engine._executable(path, engine.apply_mode)
  mem = compiling.memory_analysis(compiled)
  return mem is not None and mem.temp_size_in_bytes > SPLIT_ABOVE


def key_offset(leaf, rows) -> np.uint32 | None:
  """The flat index of a block's first entry (None for a whole leaf)."""
  if rows is None:
    return None
  return np.uint32(rows[0] * int(np.prod(np.shape(leaf)[1:], dtype=np.int64)))


def folded_keys(engine: Any, paths, rows=None) -> leafwise.FoldedKeys:
  """The random rule's keys for `paths` (a block of `rows` of one leaf: at its offset). Every
  merged leaf's are folded once, in one vectorized call (~2 ms a call: 0.8 s over a ViT's)."""
  cache = engine.__dict__.setdefault("_key_words", {})
  if "all" not in cache:
    words = sparsify.leaf_key_data(engine.key, len(engine.experts), engine.merged_paths)
    cache["all"] = np.asarray(words)
  index = tuple(engine.index[p] for p in paths)
  if index not in cache:  # On the device once per leaf (not an input XLA copies at each call).
    cache[index] = jnp.asarray(cache["all"][:, list(index)])
  data = cache[index]
  return leafwise.FoldedKeys(data, key_offset(engine.base[paths[0]], rows))


def _blocker(engine: Any, path: str) -> str | None:
  """Why the leaf cannot be merged in blocks of rows, or None if it can."""
  rule, shape = engine.rule, np.shape(engine.base[path])
  if rule.row_split is None or not rule.row_split(engine.full, len(shape)):
    return f"{rule.name} (with these options) cannot merge a leaf in blocks of rows."
  if engine.num_totals:
    return f"{rule.name} takes whole-model sums, so its leaves are merged whole."
  if engine.layout is not None:
    return "Leaves are not split into blocks on a mesh."
  if not shape or shape[0] < 2:
    return "The leaf has a single row."
  return None


def over_budget(engine: Any, path: str, working_set: int) -> ValueError:
  """The error for a leaf whose working set exceeds the budget, saying why blocks of rows did
  not help."""
  why = _blocker(engine, path) or "Even a block of one row does not fit the budget."
  return ValueError(
    f"Leaf {path!r} ({np.shape(engine.base[path])}, {len(engine.experts)} experts) needs "
    f"{_size(working_set)} of working memory to merge with {engine.rule.name}, more than the "
    f"memory budget of {_size(engine.budget)}. Raise memory_budget_gb (the budget holds the "
    "leaf's output, XLA's temporaries and the inputs XLA copies: all but 64-byte aligned NumPy "
    f"arrays, such as the tensors of files mergejax wrote). {why}"
  )


def rows_per_block(engine: Any, path: str, working_set: int) -> tuple[int, int] | None:
  """(rows per block, working set) for a leaf whose program needs `working_set` bytes, more than
  the budget or with `large_temporaries`, or None if it cannot be split (or need not, and one
  row's program needs more than SPLIT_ABOVE).

  A block's program needs at most SPLIT_ABOVE where one row's allows, else the budget; the
  working set counts it and the whole output leaf the blocks fill. Blocks divide the rows evenly
  where that costs at most half of the block (one compiled program per leaf).
  """
  shape = np.shape(engine.base[path])
  if _blocker(engine, path) is not None:
    return None
  out_bytes = int(np.prod(shape, dtype=np.int64)) * engine.output_dtype(path).itemsize
  room = engine.budget - out_bytes
  caps = sorted({min(room, SPLIT_ABOVE), room} if working_set > engine.budget else {SPLIT_ABOVE})
  for cap in caps:
    rows = min(shape[0] - 1, int(shape[0] * cap / working_set)) if cap > 0 else 0
    while rows >= 1:  # The estimate assumes a working set linear in the rows; check, halve.
      rows = _dividing(rows, shape[0])
      program = engine.leaf_working_set(path, (0, rows))
      if program <= cap and program + out_bytes <= engine.budget:
        return rows, program + out_bytes
      rows //= 2
  return None


def _dividing(rows: int, n: int) -> int:
  """The largest divisor of n at most `rows`, if at least rows / 2; else `rows`."""
  for d in range(rows, rows // 2, -1):
    if n % d == 0:
      return d
  return rows


def merge_in_blocks(engine: Any, path: str, totals) -> np.ndarray:
  """The merged leaf, block after block of `engine.row_blocks[path]` rows.

  Args:
    engine: the `StreamingMerge`.
    path: the leaf.
    totals: the whole-model sums' values (none: split rules take none).

  Returns:
    The output leaf in its output dtype.
  """
  shape, step = np.shape(engine.base[path]), engine.row_blocks[path]
  out = np.empty(shape, engine.output_dtype(path))
  for start in range(0, shape[0], step):
    rows = (start, min(shape[0], start + step))
    compiled, _ = engine._executable(path, "apply", rows)
    args = engine._args([path], engine._leaf_stats(path), totals, rows)
    merged, report = compiled(*args)
    if engine.check:
      check_outputs(path, engine.base, engine.experts, [merged], report)
    out[rows[0] : rows[1]] = hosts.to_host(merged["x"])
  return out
