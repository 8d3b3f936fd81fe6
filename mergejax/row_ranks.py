"""Ranks and order statistics of magnitudes within rows (DELLA's MagPrune, Breadcrumbs' masks),
computed where they are fastest: NumPy's vectorized sorts on CPU, XLA elsewhere."""

from __future__ import annotations

import concurrent.futures
import functools
import os
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mergejax import host_call, selection

_LOW_WORD = 0 if sys.byteorder == "little" else 1  # Of a uint64 viewed as two uint32.
_RANK_BLOCK = 1 << 18  # Entries per host sort step: 2 MB of keys, sorted while in cache.
# Entries per step of the host k-th largest: 1 MB of float32 scratch, sorted while in cache (8
# experts x 512 x 8192 bf16, 2 threads: 0.14 s per 134M entries in blocks of 2^18, 0.22 s in
# NumPy's sorts of 2^20-entry copies).
_KTH_BLOCK = 1 << 18


def ranks_per_row(x: jax.Array) -> jax.Array:
  """Stable ranks of |x| along the last axis: 0 for the smallest, ties in index order.

  The same numbers as `argsort(argsort(|x|))` with stable sorts. On CPU (unless the program is
  split over devices) one NumPy sort of packed 64-bit keys (|x|'s bits, index) per block of rows:
  ~10x faster than XLA's two comparator sorts (8 x 1536 x 384 entries, jitted, after the
  compile: 0.11 s against 1.14 s).

  Args:
    x: array [..., m], NaN-free.

  Returns:
    float32 ranks of the shape of `x`.
  """
  return ranks_per_row_many([x])[0]


def ranks_per_row_many(xs: Sequence[jax.Array], *, spread: bool = False) -> list[jax.Array]:
  """`ranks_per_row` of each array of `xs` (any shapes), in one host call on CPU whose blocks of
  rows run on every core: DELLA ranks every expert's leaf, and a call per expert ran them one
  after the other (8 x 1536 x 384 entries, 2 cores: 79 ms; 35 ms with blocks of 2^18 entries
  and the indices scattered through flat offsets).

  Args:
    xs: arrays [..., m] (m may differ between them), NaN-free.
    spread: return `rank_spread(ranks, m)` instead of the ranks (DELLA's).

  Returns:
    float32 ranks (or spreads), one array per input, of its shape.
  """
  magnitudes = [jnp.abs(x.astype(jnp.float32)) for x in xs]

  def on_device(*arrays):
    ranks = [jnp.argsort(jnp.argsort(a, axis=-1), axis=-1).astype(jnp.float32) for a in arrays]
    if spread:
      ranks = [
        rank_spread(r, a.shape[-1] if a.ndim else 1) for r, a in zip(ranks, arrays, strict=True)
      ]
    return ranks

  def on_host(*arrays):
    shapes = [jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in arrays]
    return host_call.host_call(functools.partial(_host_ranks, spread=spread), shapes, *arrays)

  if not selection.on_host_allowed():
    return on_device(*magnitudes)
  return list(host_call.on_cpu_or(*magnitudes, cpu=on_host, default=on_device))


def rank_spread(ranks, m: int):
  """Ranks r of rows of m entries mapped onto [-1, 1]: (2r − (m − 1)) · float32(1 / (m − 1)), 0
  where m = 1 (NumPy or jax arrays; in place for NumPy's).

  The same bits from NumPy, from XLA on any backend and in any fusion: 2r − (m − 1) is an exact
  integer, then one multiply. XLA turns a division by a scalar into a multiply by its reciprocal
  (72 of 384 quotients r / 383 unlike NumPy's), and may fuse a multiply and an add into an FMA.
  """
  if isinstance(ranks, np.ndarray):
    if m <= 1:
      ranks[...] = 0.0
      return ranks
    ranks *= np.float32(2.0)
    ranks -= np.float32(m - 1)
    ranks *= np.float32(1.0) / np.float32(m - 1)
    return ranks
  if m <= 1:
    return jnp.zeros_like(ranks)
  return (ranks * np.float32(2.0) - np.float32(m - 1)) * (np.float32(1.0) / np.float32(m - 1))


def run_tasks(work, tasks) -> None:
  """Runs `work(*task)` for each task, one thread per core (NumPy's sorts release the GIL; XLA
  waits on the callback meanwhile)."""
  if len(tasks) == 1:
    work(*tasks[0])
    return
  with concurrent.futures.ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
    for done in [pool.submit(work, *task) for task in tasks]:
      done.result()


def rank_rows_into(rows: np.ndarray, out: np.ndarray) -> None:
  """Writes the stable ranks of each row of `rows` (float32 [k, m], non-negative, C-contiguous)
  into `out` (float32 [k, m], C-contiguous)."""
  m = rows.shape[-1]
  # Non-negative float32 bit patterns order as the values; the index breaks ties (stable).
  keys = rows.view(np.uint32).astype(np.uint64)
  keys <<= np.uint64(32)
  keys |= np.arange(m, dtype=np.uint64)
  keys.sort(axis=-1)
  # The sorted keys' low words are the indices; scattered through flat offsets (one pass each,
  # where masking, converting and np.put_along_axis took 2.2x as long).
  order = keys.view(np.uint32)[:, _LOW_WORD::2].astype(np.intp)
  order += np.arange(0, rows.shape[0] * m, m, dtype=np.intp)[:, None]
  positions = np.broadcast_to(np.arange(m, dtype=np.float32), order.shape)
  out.reshape(-1)[order.reshape(-1)] = positions.reshape(-1)


def _host_ranks(outputs, *arrays, spread: bool = False) -> None:
  def work(rows, out, start, stop):
    rank_rows_into(rows[start:stop], out[start:stop])
    if spread:
      rank_spread(out[start:stop], rows.shape[-1])

  tasks = []
  for a, buffer in zip(arrays, outputs, strict=True):
    m = a.shape[-1] if a.ndim else 1
    rows = a.reshape(-1, m)
    out = _reshaped(buffer, rows.shape)
    step = max(1, _RANK_BLOCK // max(m, 1))  # Blocks of ~_RANK_BLOCK entries.
    tasks += [(rows, out, s, min(s + step, rows.shape[0])) for s in range(0, rows.shape[0], step)]
  run_tasks(work, tasks)


def _reshaped(buffer: np.ndarray, shape) -> np.ndarray:
  """A view of an output `buffer` in another shape (raises rather than fill a copy)."""
  view = buffer.view()
  view.shape = shape
  return view


def kth_largest_magnitudes_per_row(
  xs: Sequence[jax.Array], ks, *, origin: jax.Array | None = None
) -> jax.Array:
  """The k-th largest |x − origin| along the last axis, for each x of `xs`, every row and each k.

  The values of `selection.kth_largest_magnitude_per_row` (bisection) on float32(x) −
  float32(origin). On CPU (unless the program is split over devices) one callback sorts every
  input's rows with NumPy, computing the magnitudes beside each sort in cache-sized blocks: handed
  bf16 checkpoints' leaves rather than float32 |τ|, it moves half the bytes and XLA materializes
  nothing (Breadcrumbs, a 512 x 8192 leaf x 8 experts: 0.89 -> 0.55 s; 0.43 s reading XLA's
  buffers in place through `host_call`).

  Args:
    xs: arrays [..., m] of one shape, NaN-free (e.g. the experts' leaves, or task vectors).
    ks: ranks, each 1 <= k <= m, may be traced.
    origin: an array of the shape of `xs`' subtracted from each (e.g. the base's leaf), or None.

  Returns:
    float32 [len(xs), len(ks), ...].
  """
  ks = jnp.stack([jnp.asarray(k, jnp.int32) for k in ks])
  operands = list(xs) if origin is None else [origin, *xs]
  shape = jax.ShapeDtypeStruct((len(xs), ks.shape[0], *jnp.shape(xs[0])[:-1]), jnp.float32)

  def on_device(ks, *operands):
    first = 0 if origin is None else 1
    shift = 0.0 if origin is None else operands[0].astype(jnp.float32)
    kth = selection.kth_largest_magnitude_per_row
    magnitudes = [x.astype(jnp.float32) - shift for x in operands[first:]]
    return jnp.stack([jnp.stack([kth(a, k) for k in ks]) for a in magnitudes])

  def on_host(ks, *operands):
    fill = functools.partial(_host_kth, with_origin=origin is not None)
    return host_call.host_call(fill, [shape], ks, *operands)[0]

  if not selection.on_host_allowed():
    return on_device(ks, *operands)
  return host_call.on_cpu_or(ks, *operands, cpu=on_host, default=on_device)


def _host_kth(outputs, ks, *operands, with_origin: bool) -> None:
  m = operands[0].shape[-1]
  rows = [a.reshape(-1, m) for a in operands]
  origin, xs = (rows[0], rows[1:]) if with_origin else (None, rows)
  out = _reshaped(outputs[0], (len(xs), ks.size, xs[0].shape[0]))

  # XLA on CPU flushes subnormal inputs and results to zero, and so does NumPy here: the callback
  # runs on XLA's thread, whose floating-point mode the pool's threads inherit (tested).
  def work(start, stop, which):
    shift = None if origin is None else origin[start:stop].astype(np.float32)
    for i in which:
      magnitude = xs[i][start:stop].astype(np.float32)  # A copy, sorted in place.
      if shift is not None:
        np.subtract(magnitude, shift, out=magnitude)
      np.abs(magnitude, out=magnitude)
      magnitude.sort(axis=-1)
      out[i, :, start:stop] = magnitude[:, m - ks].T

  n = xs[0].shape[0]
  step = max(1, _KTH_BLOCK // max(m, 1))
  if n <= step:  # One block of rows (a whole leaf as one row): one task per input instead.
    tasks = [(0, n, [i]) for i in range(len(xs))]
  else:
    tasks = [(s, min(s + step, n), range(len(xs))) for s in range(0, n, step)]
  run_tasks(work, tasks)
