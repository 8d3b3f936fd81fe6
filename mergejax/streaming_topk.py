"""Exact model-wide top-k of leaves that arrive one at a time (the streaming engine's TIES trim).

Same statistics as `selection.top_k_stats`, bit for bit: NumPy's partition of the candidates
when they fit the memory budget (`model_top_k_stats`), else two passes over the leaves
(`StreamingTopK`) instead of one partition of them all.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable, Iterator, Sequence

import jax.numpy as jnp
import numpy as np

from mergejax import selection
from mergejax.selection import TopKStats

# Host selection's memory: per kept entry, the candidates (listed, then concatenated), their
# magnitudes, the kept ones (~20 bytes); per entry of the largest leaf, its scratch (9 bytes).
_CANDIDATE_BYTES, _SCRATCH_BYTES = 20, 9


def model_top_k_stats(
  leaves: Callable[[], Iterator[tuple[np.ndarray, list[np.ndarray]]]],
  sizes: Sequence[int],
  k: int,
  memory_budget: int | None = None,
) -> TopKStats:
  """`TopKStats` of each expert's task vector over all leaves, the top `k` entries of each.

  When the selection of about k candidates per expert fits in half of `memory_budget` (with the
  leaves themselves where they are copies, not views of memory-mapped or CPU arrays), this is
  `selection.top_k_stats_eager` on the views, the selection `rules.merge` runs on CPU (a strided
  sample, then one pass keeping ~k candidates for introselect). Otherwise, or without a budget,
  `StreamingTopK`'s two passes over `leaves()`.

  Args:
    leaves: starts a pass over the leaves, yielding `(base_leaf, [expert leaves])`.
    sizes: the leaves' entry counts.
    k: entries kept per expert.
    memory_budget: bytes of working memory the selection may use (None: stream).

  Returns:
    [T] float32 `TopKStats`, one entry per expert.
  """
  need = _CANDIDATE_BYTES * k + _SCRATCH_BYTES * max(sizes)
  if memory_budget is not None and need <= memory_budget // 2:
    views = list(leaves())  # Memory-mapped inputs: nothing is read here.
    need += sum(x.nbytes for b, xs in views for x in (b, *xs) if x.flags.owndata)
    if need <= memory_budget // 2:
      groups = [[xs[t] for _, xs in views] for t in range(len(views[0][1]))]
      origins = [[b for b, _ in views]] * len(groups)
      return selection.top_k_stats_eager(groups, [k] * len(groups), origins=origins)
  topk = None
  with concurrent.futures.ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
    for collect in (False, True):
      for base, experts in leaves():
        if topk is None:
          topk = StreamingTopK([k] * len(experts))
        # A task per expert; the next leaf waits for all, so each expert adds its leaves in order.
        done = [pool.submit(topk.add, t, x, base, collect=collect) for t, x in enumerate(experts)]
        for future in done:
          future.result()
      if not collect:
        topk.select()
  return topk.finalize()


_BINS = 1 << 15  # Histogram bins: a float32 magnitude's bit pattern >> 16 (sign bit clear).
_CHUNK = 1 << 22  # Entries per host pass step (16 MB of float32 scratch).


class StreamingTopK:
  """Exact `top_k_stats` of groups whose leaves arrive one at a time, in two passes over them.

  The streaming engine cannot hold a whole model to partition it. Pass 1 (`add`) counts each
  group's magnitudes in a histogram of their float32 bit patterns' top 16 bits (monotone in the
  magnitude; 2^7 bins per octave); `select` finds the bin holding the k-th largest; pass 2
  (`add(..., collect=True)`) sums the entries above that bin and keeps those inside it, about
  n / 2^7 per octave at most; `finalize` partitions those. Memory: the histogram, one chunk of
  scratch, and the threshold bin's entries. The threshold equals `top_k_stats`'s bit for bit.
  """

  def __init__(self, ks: Sequence[int]):
    self.ks = [int(k) for k in ks]
    self.counts = np.zeros((len(self.ks), _BINS), np.int64)
    self.bins: list[int] | None = None

  @staticmethod
  def _chunks(x, origin):
    x = np.asarray(x).reshape(-1)
    o = None if origin is None else np.asarray(origin).reshape(-1)
    for start in range(0, x.size, _CHUNK):
      part = x[start : start + _CHUNK]
      if o is None:
        yield part.astype(np.float32)
      else:
        yield np.subtract(part, o[start : start + _CHUNK], dtype=np.float32)

  def add(self, group: int, x, origin=None, *, collect: bool = False) -> None:
    """Adds one leaf of `group`: counted in pass 1, collected in pass 2 (`collect=True`).

    Calls for different groups may run in parallel threads (NumPy releases the GIL)."""
    for d in self._chunks(x, origin):
      # |d|'s bit pattern >> 16, as intp: np.bincount is several times slower on uint32.
      high = np.bitwise_and(np.right_shift(d.view(np.int32), 16), 0x7FFF).astype(np.intp)
      if not collect:
        self.counts[group] += np.bincount(high, minlength=_BINS)
        continue
      b = self.bins[group]
      above = np.compress(high > b, d)
      self.kept_sum[group] += np.sum(above, dtype=np.float64)
      self.kept_sign[group] += float(np.count_nonzero(above > 0) - np.count_nonzero(above < 0))
      self.candidates[group].append(np.compress(high == b, d))

  def select(self) -> None:
    """Between the passes: the bin of each group's k-th largest magnitude."""
    self.bins, self.ranks = [], []
    for counts, k in zip(self.counts, self.ks, strict=True):
      if not 1 <= k <= counts.sum():
        raise ValueError(f"k={k} is outside [1, {int(counts.sum())}] (entries seen).")
      from_top = np.cumsum(counts[::-1])
      j = int(np.searchsorted(from_top, k))
      b = _BINS - 1 - j
      self.bins.append(b)
      self.ranks.append(k - int(from_top[j] - counts[b]))  # Rank of the k-th inside its bin.
    self.kept_sum = np.zeros(len(self.ks))
    self.kept_sign = np.zeros(len(self.ks))
    self.candidates = [[] for _ in self.ks]

  def finalize(self) -> TopKStats:
    """After pass 2: the `TopKStats` of every group ([G] float32)."""
    out = []
    for g, rank in enumerate(self.ranks):
      candidates = np.concatenate(self.candidates[g])
      magnitude = np.abs(candidates)
      index = candidates.size - rank
      threshold = np.partition(magnitude, index)[index]
      kept = candidates[magnitude >= threshold]
      kept_sum = self.kept_sum[g] + np.sum(kept, dtype=np.float64)
      kept_sign = self.kept_sign[g] + float(np.sum(np.sign(kept), dtype=np.float64))
      out.append((threshold, kept_sum, kept_sign))
    return TopKStats(*(jnp.asarray([r[i] for r in out], jnp.float32) for i in range(3)))
