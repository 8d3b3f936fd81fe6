"""DARE-TIES's whole-model trim outside jit: the k-th largest |dropped τ| of each expert.

MergeLM's DARE-TIES trims the *dropped* task vectors to their top fraction over the whole model.
Inside one jit that selection is slow on CPU (`rules.merge` on 22M x 8 experts: 26 s) and needs
every dropped vector at once, which a streaming merge cannot hold. Here the dropped values are
recomputed on the host in chunks of the flattened leaves (`leafwise.flat_chunk`: the rule's
own `sparsify.random_drop` with per-leaf keys and the chunk's flat offset, so the same uniforms),
and the thresholds come from the exact host selection (`selection.top_k_stats_eager` when
everything fits, else `streaming_topk.model_top_k_stats`'s passes). The rule's apply step draws
the drop again inside jit and trims at these thresholds.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mergejax import combine, leafwise, selection, sparsify, streaming_topk
from mergejax import task_vectors as tv
from mergejax.io import readahead
from mergejax.selection import TopKStats
from mergejax.tree import path_str

_THREADS = len(os.sched_getaffinity(0))


@functools.partial(jax.jit, static_argnames=("rescale",))
def _dropped_chunk(base, experts, key_data, offset, density, *, rescale):
  vectors = tv.task_vectors({"x": base}, [{"x": e} for e in experts])
  keys = leafwise.FoldedKeys(key_data[:, None], offset)
  return [v["x"] for v in sparsify.random_drop(vectors, keys, density, rescale=rescale)]


def dropped_leaves(
  leaves: Callable[[], Iterator[tuple[Any, Sequence[Any]]]],
  paths: Sequence[str],
  key: jax.Array,
  density: Any,
  rescale: str,
  sizes: Sequence[int] | None = None,
) -> Callable[[], Iterator[tuple[None, list[np.ndarray]]]]:
  """Starts passes over the experts' dropped task vectors, leaf by leaf.

  Args:
    leaves: starts a pass over `(base_leaf, [expert leaves])` (NumPy arrays or views).
    paths: the leaves' "a/b/c" paths (their keys: `sparsify.leaf_key_data`).
    key: the rule's key.
    density: DARE's keep probability.
    rescale: DARE's rescale ("l1" rescales per leaf: then each leaf is one call, in its shape).
    sizes: the leaves' entry counts, if known: each pass first compiles every chunk size's
      program in parallel threads.

  Returns:
    A function starting a pass that yields `(None, [flat float32 dropped τt per expert])` per
    piece of each leaf (`piece_sizes`): the drop program's outputs as they come, one call's
    chunk each (copying them into larger arrays took 3-5x the drop itself: fresh pages).
  """
  paths = list(paths)
  density = jnp.float32(density)

  def jobs(data):  # The pass's calls, in order: (function, arguments).
    for path_index, (base, experts) in enumerate(leaves()):
      if rescale == "l1":  # Norms per leaf: the leaf whole, in its shape (the same sums).
        args = (base, list(experts), data[:, path_index], np.uint32(0), density)
        yield _whole_leaf, args + (rescale,)
        continue
      b = np.asarray(base).reshape(-1)
      xs = [np.asarray(x).reshape(-1) for x in experts]
      for start, _, chunk in leafwise.flat_pieces(b.size):
        yield _drop_at, (b, xs, start, chunk, chunk, data[:, path_index], density, rescale)

  compiled = []  # Whether the chunk programs were compiled ahead (by the first pass).

  def run():
    if (leaf := next(leaves(), None)) is None:
      return
    data = np.asarray(sparsify.leaf_key_data(key, len(leaf[1]), paths))
    if rescale != "l1" and not compiled:
      _compile_ahead(leaf, sizes, data[:, 0], density, rescale)
      compiled.append(True)
    calls = jobs(data)
    if (call := next(calls, None)) is None:
      return
    yield None, call[0](*call[1])  # Alone: a consumer may stop after one (then no more ran).
    # The others run in threads, a few ahead of the consumer (XLA runs each in its caller's
    # thread, releasing the GIL): 22M x 8 fp32, the drop pass's compute took ~0.5 s on one core.
    with concurrent.futures.ThreadPoolExecutor(_THREADS) as pool:
      ahead: collections.deque = collections.deque()
      for fn, args in calls:
        ahead.append(pool.submit(fn, *args))
        if len(ahead) > 2 * _THREADS:
          yield None, ahead.popleft().result()
      while ahead:
        yield None, ahead.popleft().result()

  return run


def _whole_leaf(base, experts, key_data, offset, density, rescale) -> list[np.ndarray]:
  dropped = _dropped_chunk(base, experts, key_data, offset, density, rescale=rescale)
  return [np.asarray(d).reshape(-1) for d in dropped]


def _compile_ahead(first, sizes, key_data, density, rescale) -> None:
  """Compiles the drop program for every chunk size of leaves of `sizes` (in the dtypes of the
  `first` leaf's inputs; others compile as they come), in parallel threads (XLA compiles without
  the GIL), by running each once on zeros."""
  padded = sorted({chunk for n in sizes or () for _, _, chunk in leafwise.flat_pieces(n)})
  if len(padded) < 2:
    return

  def run(n):
    parts = [np.zeros(n, np.asarray(x).dtype) for x in (first[0], *first[1])]
    _whole_leaf(parts[0], parts[1:], key_data, np.uint32(0), density, rescale)

  with concurrent.futures.ThreadPoolExecutor(min(len(padded), _THREADS)) as pool:
    list(pool.map(run, padded))


def _drop_at(b, xs, start, length, padded, key_data, density, rescale) -> list[np.ndarray]:
  """The dropped `b`, `xs` (flat) at [start, start + length), by one call of `padded` entries."""
  stop = min(start + length, b.size)
  parts = [b[start:stop], *(x[start:stop] for x in xs)]
  if stop - start < padded:
    parts = [np.pad(p, (0, padded - (stop - start))) for p in parts]
  dropped = _dropped_chunk(
    parts[0], parts[1:], key_data, np.uint32(start), density, rescale=rescale
  )
  return [np.asarray(d)[: stop - start] for d in dropped]


def dropped_sample(
  leaves: Callable[[], Iterator[tuple[Any, Sequence[Any]]]],
  paths: Sequence[str],
  key: jax.Array,
  density: Any,
  rescale: str,
) -> streaming_topk.SampleBlocks | None:
  """The `streaming_topk.SampleBlocks` of `dropped_leaves`'s pieces: each sampled block dropped
  by itself, from a pass over the (memory-mapped) leaves that reads the blocks alone.

  Returns:
    None for rescale "l1" (a block's values need its whole leaf's norm).
  """
  if rescale == "l1":
    return None
  paths = list(paths)
  density = jnp.float32(density)

  def sample(starts, lengths):
    pieces, padded, data = iter(zip(starts, lengths, strict=True)), max(lengths), None
    for path_index, (base, experts) in enumerate(leaves()):
      if data is None:
        data = np.asarray(sparsify.leaf_key_data(key, len(experts), paths))
      b = np.asarray(base).reshape(-1)
      xs = [np.asarray(x).reshape(-1) for x in experts]
      chunk = leafwise.flat_chunk(b.size)
      for first in range(0, b.size, chunk):
        piece_starts, length = next(pieces)
        with readahead.sampling(b, *xs):
          blocks = [
            _drop_at(b, xs, first + s, length, padded, data[:, path_index], density, rescale)
            for s in piece_starts
          ]
        yield [np.concatenate(per_expert) for per_expert in zip(*blocks, strict=True)]

  return sample


def piece_sizes(sizes: Sequence[int], rescale: str) -> list[int]:
  """The entry counts of what a pass of `dropped_leaves` yields, for leaves of `sizes`."""
  if rescale == "l1":
    return list(sizes)
  return [length for n in sizes for _, length, _ in leafwise.flat_pieces(n)]


def _leaves_of(base, experts):
  def run():
    expert_leaves = [jax.tree.leaves(e) for e in experts]
    for i, b in enumerate(jax.tree.leaves(base)):
      yield b, [leaves[i] for leaves in expert_leaves]

  return run


def prepare(base, experts, *, key, density, rescale, trim_density, **unused) -> TopKStats | None:
  """`rules.merge`'s host pre-pass (CPU, concrete inputs): the trim's `TopKStats` per expert.

  Args:
    base / experts: the merged trees (concrete arrays).
    key, density, rescale, trim_density: DARE-TIES's hyper-parameters.

  Returns:
    [T] `TopKStats` over the whole model, or None without a trim.
  """
  del unused
  if trim_density is None:
    return None
  paths = [path_str(p) for p, _ in jax.tree.flatten_with_path(base)[0]]
  sizes = [int(np.size(x)) for x in jax.tree.leaves(base)]
  pass_ = dropped_leaves(_leaves_of(base, experts), paths, key, density, rescale, sizes)
  leaves = [xs for _, xs in pass_()]
  k = _count(sum(int(np.size(x)) for x in jax.tree.leaves(base)), trim_density)
  groups = [[xs[t] for xs in leaves] for t in range(len(experts))]
  return selection.top_k_stats_eager(groups, [k] * len(groups))


def stream_stats(
  leaves, sizes, *, paths, key, density, rescale, trim_density, memory_budget=None, **unused
) -> Callable[[int], TopKStats | None]:
  """The streaming engine's pre-pass: the same statistics as `prepare`, within the budget.

  Args:
    leaves / sizes / memory_budget: see `rules.spec.RuleSpec.stream_stats`.
    paths: the merged leaves' paths.
    key, density, rescale, trim_density: DARE-TIES's hyper-parameters.

  Returns:
    `leaf_stats(i)`: the model-wide statistics for every leaf (None without a trim).
  """
  del unused
  if trim_density is None:
    return lambda i: None
  k = _count(sum(sizes), trim_density)
  dropped = dropped_leaves(leaves, paths, key, density, rescale, sizes)
  sample = dropped_sample(leaves, paths, key, density, rescale)
  stats = streaming_topk.model_top_k_stats(
    dropped, piece_sizes(sizes, rescale), k, memory_budget, computed=True, sample=sample
  )
  return lambda i: stats


def with_stats(
  base, experts, trim_stats, *, key, density, scale, rescale, election, reduce, trim_density,
  weights,
):  # fmt: skip
  """DARE-TIES (`rules.sparse.dare_ties`), with the trim's statistics when given.

  With `trim_stats` (from `prepare` / `stream_stats`: the thresholds of these same dropped
  vectors) the trim is a comparison, and the election's zero-sum fallback comes from the kept
  sums; without, the selection runs inside jit.
  """
  vectors = sparsify.random_drop(tv.task_vectors(base, experts), key, density, rescale=rescale)
  total = None
  if trim_density is not None and trim_stats is None:
    vectors = sparsify.trim_top_fraction(vectors, trim_density, scope="model")
  elif trim_density is not None:
    vectors = [
      jax.tree.map(lambda x, th=trim_stats.threshold[t]: jnp.where(jnp.abs(x) >= th, x, 0.0), v)
      for t, v in enumerate(vectors)
    ]
    total = combine.election_total(trim_stats, election, weights, len(experts))
  merged = combine.ties_combine(
    vectors, election=election, reduce=reduce, total=total, weights=weights
  )
  return tv.apply(base, merged, scale)


def _count(n: int, trim_density) -> int:
  # From the concrete float64 fraction, as TIES's host pre-pass counts.
  return int(selection.count_for_fraction(n, float(trim_density), "round"))
