"""Exact model-wide top-k of leaves that arrive one at a time (the streaming engine's TIES trim).

Same statistics as `selection.top_k_stats`: NumPy's partition of the candidates when they fit the
memory budget (`model_top_k_stats`), else one pass collecting a band of magnitudes located by a
sample, else two passes over the leaves (`StreamingTopK`) instead of one partition of them all.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax.numpy as jnp
import numpy as np

from mergejax import selection
from mergejax.io import readahead
from mergejax.selection import TopKStats

# Host selection's memory: per kept entry, the candidates (listed, then concatenated), their
# magnitudes, the kept ones (~20 bytes); per entry of the largest leaf, its scratch (9 bytes).
_CANDIDATE_BYTES, _SCRATCH_BYTES = 20, 9

# `sample(starts, lengths)` yields, for each leaf i, each expert's float32 task-vector entries at
# the blocks [s, s + lengths[i]) for s in starts[i], concatenated.
SampleBlocks = Callable[[Sequence[np.ndarray], Sequence[int]], Iterator[list[np.ndarray]]]


def model_top_k_stats(
  leaves: Callable[[], Iterator[tuple[np.ndarray, list[np.ndarray]]]],
  sizes: Sequence[int],
  k: int,
  memory_budget: int | None = None,
  *,
  computed: bool = False,
  sample: SampleBlocks | None = None,
) -> TopKStats:
  """`TopKStats` of each expert's task vector over all leaves, the top `k` entries of each.

  When the selection of about k candidates per expert, for as many experts as it selects at once
  (`selection.host_threads`), fits in half of `memory_budget` (with the leaves themselves where
  they are copies, not views of memory-mapped or CPU arrays), this is
  `selection.top_k_stats_eager` on the views, the selection `rules.merge` runs on CPU (a strided
  sample, then one pass keeping ~k candidates for introselect). Otherwise `StreamingTopK`: one
  pass over `leaves()` collecting a band around each k-th largest magnitude that a sample of ~1M
  entries per expert locates, when the band fits half the budget (a band that misses, which the
  pass detects, falls back); without a budget or a fitting band, its two passes.

  Args:
    leaves: starts a pass over the leaves, yielding `(base_leaf, [expert leaves])`; a base leaf
      None selects on the experts' leaves themselves.
    sizes: the leaves' entry counts.
    k: entries kept per expert.
    memory_budget: bytes of working memory the selection may use (None: stream).
    computed: each pass computes the leaves it yields (DARE-TIES's dropped vectors), so every
      one kept for the in-memory selection counts against the budget, view or not.
    sample: optional `SampleBlocks` computing the band's sample from the inputs at the sampled
      places alone (default: sliced from a pass over `leaves()`, which for computed leaves
      means computing them all).

  Returns:
    [T] float32 `TopKStats`, one entry per expert.
  """
  views = None
  if memory_budget is not None:  # The leaves, kept while they cost nothing (views) or fit.
    views, copies = [], 0
    for base, experts in leaves():  # Memory-mapped inputs: nothing is read here.
      held = [x for x in (base, *experts) if x is not None and (computed or x.flags.owndata)]
      copies += sum(x.nbytes for x in held)
      # Computed leaves that cannot all fit are not computed on to find out.
      whole = sum(x.itemsize for x in held) * sum(sizes) if computed and not views else 0
      if max(copies, whole) > memory_budget // 2:
        views = None
        break
      views.append((base, experts))
  if views is not None:
    num_experts = len(views[0][1])
    # The experts' selections run in parallel threads, each with its own candidates and scratch.
    parallel = selection.host_threads(num_experts)
    need = (_CANDIDATE_BYTES * k + _SCRATCH_BYTES * max(sizes)) * parallel
    if need + copies <= memory_budget // 2:
      groups = [[xs[t] for _, xs in views] for t in range(num_experts)]
      origins = None if views[0][0] is None else [[b for b, _ in views]] * num_experts
      return selection.top_k_stats_eager(groups, [k] * num_experts, origins=origins)
  with concurrent.futures.ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:

    def run_pass(topk: StreamingTopK | None, collect: bool) -> StreamingTopK:
      pending = []
      # The next leaf comes (computed, for computed leaves) while the pool adds this one.
      for base, experts in leaves():
        readahead.will_need(base, *experts)  # Read while the pool adds the leaf before.
        topk = topk or StreamingTopK([k] * len(experts))
        for future in pending:  # Each expert adds its leaves in order (the same sums).
          future.result()
        pending = [
          pool.submit(topk.add, t, x, base, collect=collect) for t, x in enumerate(experts)
        ]
      for future in pending:
        future.result()
      return topk

    if memory_budget is not None:
      topk = StreamingTopK([])
      if sample is None:
        sample = functools.partial(_sliced_blocks, views or leaves())
      if topk.select_from_sample(sample, sizes, k) <= memory_budget // 2:
        stats = run_pass(topk, True).finalize()
        if stats is not None:
          return stats  # One pass: each k-th largest was inside its sampled band (almost always).
    topk = run_pass(None, False)
    topk.select()
    run_pass(topk, True)
  return topk.finalize()


_BINS = 1 << 15  # Histogram bins: a float32 magnitude's bit pattern >> 16 (sign bit clear).
# Entries per host pass step: 512 KB of float32 scratch, which stays in the cache. 16 MB steps took
# 2-5x longer per entry here (bf16 task vectors): their temporaries miss the cache and are fresh
# memory maps, whose pages fault in again at every step (4x the page faults).
_CHUNK = 1 << 17
_SAMPLE_BLOCKS, _BLOCK = 1024, 1024  # The band's sample: blocks of contiguous entries per expert.
_SIGMAS, _SLACK = 8.0, 64  # The band's margin around the sample's k-th, in sample ranks.


class StreamingTopK:
  """Exact `top_k_stats` of groups whose leaves arrive one at a time, in two passes over them.

  The streaming engine cannot hold a whole model to partition it. Pass 1 (`add`) counts each
  group's magnitudes in a histogram of their float32 bit patterns' top 16 bits (monotone in the
  magnitude; 2^7 bins per octave); `select` finds the bin holding the k-th largest; pass 2
  (`add(..., collect=True)`) sums the entries above that bin and keeps those inside it, about
  n / 2^7 per octave at most; `finalize` partitions those. Memory: the histogram, one chunk of
  scratch, and the threshold bin's entries. The threshold equals `top_k_stats`'s bit for bit.

  Or one pass: `select_from_sample` reads ~1M entries per group in blocks at random places and
  takes a band of bins that holds the k-th largest magnitude unless the sample is off by more
  than 8 standard deviations; pass 2 collects the band, and `finalize` checks that the k-th
  largest is inside it (None if not: then the two passes above).
  """

  def __init__(self, ks: Sequence[int]):
    self.ks = [int(k) for k in ks]
    self.counts = np.zeros((len(self.ks), _BINS), np.int64)
    self.bins: list[tuple[int, int]] | None = None  # Per group, the band [low, high] collected.

  @staticmethod
  def _chunks(x, origin):
    x = np.asarray(x).reshape(-1)
    o = None if origin is None else np.asarray(origin).reshape(-1)
    for start in range(0, x.size, _CHUNK):
      part = x[start : start + _CHUNK]
      if o is None:
        yield part.astype(np.float32, copy=False)
      else:
        yield np.subtract(part, o[start : start + _CHUNK], dtype=np.float32)

  def add(self, group: int, x, origin=None, *, collect: bool = False) -> None:
    """Adds one leaf of `group`: counted in pass 1, collected in pass 2 (`collect=True`).

    Calls for different groups may run in parallel threads (NumPy releases the GIL)."""
    for d in self._chunks(x, origin):
      if not collect:
        # |d|'s bit pattern >> 16, as intp: np.bincount is several times slower on uint32.
        high = np.bitwise_and(np.right_shift(d.view(np.int32), 16), 0x7FFF).astype(np.intp)
        self.counts[group] += np.bincount(high, minlength=_BINS)
        continue
      low, top = self.bins[group]
      if top < 0:  # A band of exact zeros alone (from a sample): every nonzero entry is above.
        # Counts of comparisons: NumPy's count_nonzero of floats is ~5x slower than of bools.
        nonzero, positive = d.size - np.count_nonzero(d == 0), np.count_nonzero(d > 0)
        self.above[group] += nonzero
        self.zeros[group] += d.size - nonzero
        self.kept_sum[group] += np.sum(d, dtype=np.float64)
        self.kept_sign[group] += float(2 * positive - nonzero)
        continue
      # Bins through |d|'s bit pattern: bin(d) > top iff bits >= (top + 1) << 16.
      bits = np.bitwise_and(d.view(np.uint32), np.uint32(0x7FFFFFFF))
      is_above = bits >= np.uint32((top + 1) << 16)
      above = np.compress(is_above, d)
      self.above[group] += above.size
      self.kept_sum[group] += np.sum(above, dtype=np.float64)
      self.kept_sign[group] += float(np.count_nonzero(above > 0) - np.count_nonzero(above < 0))
      band = bits >= np.uint32(low << 16)
      band &= ~is_above
      if low == 0:  # Exact zeros are counted, not kept (after DARE's drop: most entries).
        zero = bits == 0
        self.zeros[group] += int(np.count_nonzero(zero))
        band &= ~zero
      self.candidates[group].append(np.compress(band, d))

  def select(self) -> None:
    """Between the passes: the bin of each group's k-th largest magnitude."""
    self.bins = []
    for counts, k in zip(self.counts, self.ks, strict=True):
      if not 1 <= k <= counts.sum():
        raise ValueError(f"k={k} is outside [1, {int(counts.sum())}] (entries seen).")
      j = int(np.searchsorted(np.cumsum(counts[::-1]), k))
      self.bins.append((_BINS - 1 - j, _BINS - 1 - j))
    self._start_collecting()

  def select_from_sample(self, sample: SampleBlocks, sizes: Sequence[int], k: int) -> int:
    """Instead of pass 1: each group's band of bins from a sample (`sample`, a `SampleBlocks`
    over leaves of `sizes`), for the top `k` of every expert; returns the band's expected
    bytes."""
    n = sum(sizes)
    rng = np.random.default_rng(0)
    starts = []
    for size in sizes:
      blocks = min(-(-_SAMPLE_BLOCKS * size // n), -(-size // _BLOCK))
      starts.append(np.unique(rng.integers(0, max(size - _BLOCK, 0) + 1, blocks)))
    samples = None
    for entries in sample(starts, [min(_BLOCK, size) for size in sizes]):
      if samples is None:
        self.ks = [int(k)] * len(entries)
        self.counts = np.zeros((0, _BINS), np.int64)
        samples = [[] for _ in entries]
      for t, d in enumerate(entries):
        # Bins; exact zeros below every bin (-1): the band never needs to hold them.
        samples[t].append(np.where(d == 0, -1, np.right_shift(np.abs(d).view(np.int32), 16)))
    self.bins, expected = [], 0
    for k, drawn in zip(self.ks, samples, strict=True):
      high = np.sort(np.concatenate(drawn))[::-1]  # Bins, largest first.
      m, p = high.size, k / n
      margin = _SIGMAS * np.sqrt(m * p * (1 - p)) + _SLACK
      top = int(high[min(int(m * p - margin), m - 1)]) if m * p - margin >= 0 else _BINS - 1
      low = int(high[int(np.ceil(m * p + margin))]) if m * p + margin < m else 0
      # Zeros (bin -1) are counted, never held. A top of -1 (an exact zero at the sample's
      # upper bound for the k-th largest: DARE-TIES at its defaults, whose drop keeps fewer
      # entries than its trim) is a band of zeros alone: no candidates.
      low = max(low, 0)
      self.bins.append((low, top))
      expected += 4 * int(np.count_nonzero((high >= low) & (high <= top)) / m * n)
    self._start_collecting()
    return expected

  def _start_collecting(self) -> None:
    self.above = np.zeros(len(self.ks), np.int64)  # Entries above the band, per group.
    self.kept_sum = np.zeros(len(self.ks))
    self.kept_sign = np.zeros(len(self.ks))
    self.candidates = [[] for _ in self.ks]
    self.zeros = np.zeros(len(self.ks), np.int64)  # Exact zeros in a band from bin 0.

  def finalize(self) -> TopKStats | None:
    """After pass 2: the `TopKStats` of every group ([G] float32); None if a sampled band missed
    a group's k-th largest magnitude. The groups' partitions run in parallel threads; the
    candidates are freed as they are used, so call it once."""
    with concurrent.futures.ThreadPoolExecutor(selection.host_threads(len(self.ks))) as pool:
      out = list(pool.map(self._finalize_group, range(len(self.ks))))
    if any(r is None for r in out):
      return None
    return TopKStats(*(jnp.asarray([r[i] for r in out], jnp.float32) for i in range(3)))

  def _finalize_group(self, g: int) -> tuple[np.float32, float, float] | None:
    candidates = np.concatenate([np.zeros(0, np.float32), *self.candidates[g]])
    self.candidates[g] = []  # Freed as each group is done.
    rank = self.ks[g] - int(self.above[g])  # The k-th largest's rank inside the band.
    if candidates.size < rank <= candidates.size + self.zeros[g]:
      threshold, kept = np.float32(0.0), candidates  # The k-th largest is an exact zero.
    elif not 1 <= rank <= candidates.size:
      return None
    else:
      magnitude = np.abs(candidates)
      index = candidates.size - rank
      threshold = np.partition(magnitude, index)[index]
      kept = candidates[magnitude >= threshold]
    kept_sum = self.kept_sum[g] + np.sum(kept, dtype=np.float64)
    kept_sign = self.kept_sign[g] + float(np.sum(np.sign(kept), dtype=np.float64))
    return threshold, kept_sum, kept_sign


def _sliced_blocks(
  leaves: Iterable[tuple[np.ndarray | None, list[np.ndarray]]],
  starts: Sequence[np.ndarray],
  lengths: Sequence[int],
) -> Iterator[list[np.ndarray]]:
  """The default `SampleBlocks`: the blocks sliced from `leaves` (their task vectors when a base
  leaf is given)."""
  for (base, experts), leaf_starts, length in zip(leaves, starts, lengths, strict=True):
    index = (leaf_starts[:, None] + np.arange(length)).reshape(-1)
    with readahead.sampling(base, *experts):
      b = None if base is None else np.asarray(base).reshape(-1)[index]
      xs = [np.asarray(x).reshape(-1)[index] for x in experts]
    yield [x.astype(np.float32) if b is None else np.subtract(x, b, dtype=np.float32) for x in xs]
