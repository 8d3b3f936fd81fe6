"""Exact k-th largest magnitude over many leaves, inside jit, on any backend.

Magnitude top-k is the heart of TIES, Breadcrumbs and friends. Three exact implementations:

* "host": a callback to NumPy (`host_call`). A strided sample brackets the k-th magnitude, one
  pass per leaf keeps the ~k candidates, introselect (`np.partition`) finishes them; a failed
  bracket falls back to a partition of everything. Issue 2 measured XLA's sort/top_k on CPU
  30-50x slower than NumPy's partition at 22M entries. With a jax that lacks `buffer_callback`
  the callback gets copies of its operands (about 1 s for 8 ViT-sized experts), hence also:
* `top_k_stats_eager`: the same NumPy code on concrete arrays outside jit, reading the buffers in
  place; `rules.merge` uses it on CPU.
* "bisect": a bisection on the float32 bit pattern. For x >= 0 the int32 view of a float32 is
  monotone in x, so 31 counting passes pin down the exact bit pattern of the k-th largest value.
  Pure XLA (fused compare+sum), so it runs inside jit on GPU/TPU with no host round trip.

This module is the one place that picks a backend: inside jit, "auto" picks "host" when lowering
for CPU and "bisect" elsewhere (`lax.platform_dependent`); outside jit, `prefer_host` tells callers
holding concrete CPU arrays (the `rules.merge` front door) to use `top_k_stats_eager`. Programs
whose inputs are split over devices (`mergejax.distributed`) trace under `across_devices()`, where
"auto" is "bisect": its counts are integer sums, exact however XLA splits them, where a host
callback would gather every operand onto one device. All return the same threshold, bit for bit
(tests).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import os
import threading
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mergejax import host_call

_INF_BITS = 0x7F800000  # Bit pattern of +inf; NaN is excluded by validation.
_STATE = threading.local()
# Groups selected at once on the host: each holds its own candidates (~20 bytes per kept entry).
_THREADS = min(len(os.sched_getaffinity(0)), 4)


def across_devices() -> contextlib.AbstractContextManager[None]:
  """Within (while tracing): method "auto" selects by bisection, whatever the backend."""
  return host_call.thread_flag(_STATE, "split")


def on_host_allowed() -> bool:
  """Whether a computation may leave XLA for NumPy on CPU (not while tracing a split program)."""
  return not getattr(_STATE, "split", False)


class TopKStats(NamedTuple):
  """Per group: the k-th largest |x − origin| and statistics of the entries at or above it."""

  threshold: jax.Array  # [G] float32: k-th largest magnitude.
  kept_sum: jax.Array  # [G] float32: Σ (x − origin) over entries with magnitude >= threshold.
  kept_sign_sum: jax.Array  # [G] float32: Σ sgn(x − origin) over the same entries.


def top_k_stats(
  groups: Sequence[Sequence[jax.Array]],
  ks: Sequence[jax.Array | int] | jax.Array,
  *,
  origins: Sequence[Sequence[jax.Array]] | None = None,
  method: str = "auto",
) -> TopKStats:
  """Exact k-th largest magnitude of each group of leaves (e.g. one expert's task vector).

  With `origins`, magnitudes are |x − origin| computed on the fly: passing an expert and the
  pre-trained leaves avoids materializing task vectors (on CPU that halves the time). The kept
  sums give TIES's zero-sum election fallback without another pass over the model.

  Args:
    groups: G lists of arrays (any shapes, float dtypes), NaN-free.
    ks: G ranks, 1 <= k_g <= size of group g; may be traced.
    origins: None, or G lists of arrays with the shapes of `groups`.
    method: "auto" (host on CPU, bisect elsewhere), "host" (NumPy introselect through
      `jax.pure_callback`, groups in parallel threads) or "bisect" (pure XLA).

  Returns:
    A `TopKStats` of [G] float32 arrays.
  """
  groups = [[jnp.asarray(x) for x in g] for g in groups]
  if origins is not None:
    origins = [[jnp.asarray(x) for x in g] for g in origins]
  ks = jnp.asarray(ks, jnp.int32).reshape(len(groups))
  if method == "auto" and getattr(_STATE, "split", False):
    method = "bisect"
  if method == "host":
    return _stats_host(groups, origins, ks)
  if method == "bisect":
    return _stats_bisect(groups, origins, ks)
  if method == "auto":
    return host_call.on_cpu_or(groups, origins, ks, cpu=_stats_host, default=_stats_bisect)
  raise ValueError(f"method must be 'auto', 'host' or 'bisect', got {method!r}.")


def prefer_host(*trees) -> bool:
  """Whether to select with `top_k_stats_eager`, outside jit: CPU backend and concrete arrays.

  Args:
    *trees: the pytrees the selection will read.

  Returns:
    True on the CPU backend when no leaf is a tracer.
  """
  if jax.default_backend() != "cpu" or getattr(_STATE, "split", False):
    return False
  return not any(isinstance(x, jax.core.Tracer) for t in trees for x in jax.tree.leaves(t))


def top_k_stats_eager(
  groups: Sequence[Sequence[jax.Array]],
  ks: Sequence[int],
  *,
  origins: Sequence[Sequence[jax.Array]] | None = None,
) -> TopKStats:
  """`top_k_stats` for concrete CPU arrays, outside jit: NumPy reads the buffers in place.

  Inside jit, where jax lacks `buffer_callback`, `host_call` hands the callback copies of its
  operands: for 8 experts of 22M entries that costs ~1 s on CPU, more than the selection itself.
  Callers holding concrete arrays (the `rules.merge` front door) compute the statistics here and
  pass them in.

  Args:
    groups: G lists of concrete arrays.
    ks: G Python ints.
    origins: None, or G lists of concrete arrays.

  Returns:
    A `TopKStats` of [G] float32 jax arrays.
  """
  xs = [[np.asarray(x) for x in leaves] for leaves in groups]
  os_ = None if origins is None else [[np.asarray(x) for x in g] for g in origins]
  results = _host_groups_stats(xs, os_, ks)
  return TopKStats(*(jnp.asarray([r[i] for r in results], jnp.float32) for i in range(3)))


def host_threads(num_groups: int) -> int:
  """How many groups `top_k_stats_eager` selects at once (its memory scales with it)."""
  return max(1, min(num_groups, _THREADS))


def _host_groups_stats(groups, origins, ks) -> list[tuple]:
  """`_host_group_stats` of every group, the groups in parallel threads (NumPy releases the GIL).

  The pool is made here, not at import: threads started inside a host callback inherit XLA's
  floating-point mode (subnormals flushed), which a module-level pool's threads would not."""
  args = [(g, None if origins is None else origins[i], int(ks[i])) for i, g in enumerate(groups)]
  with concurrent.futures.ThreadPoolExecutor(host_threads(len(groups))) as pool:
    return list(pool.map(lambda a: _host_group_stats(*a), args))


def kth_largest_magnitude(
  leaves: Sequence[jax.Array], k: jax.Array | int, *, method: str = "auto"
) -> jax.Array:
  """Returns the k-th largest |x| over all entries of all `leaves`, as a float32 scalar.

  Keeping `|x| >= kth_largest_magnitude(leaves, k)` keeps the top k entries plus any that tie
  with the k-th (the TIES paper's convention).

  Args:
    leaves: arrays of any shapes and float dtypes; NaN-free.
    k: 1 <= k <= total size; may be traced (changing it does not recompile).
    method: see `top_k_stats`.

  Returns:
    A float32 scalar.

  >>> float(kth_largest_magnitude([jnp.array([3.0, -5.0]), jnp.array([1.0])], 2))
  3.0
  """
  return top_k_stats([leaves], [k], method=method).threshold[0]


_SAMPLE_SIZE = 65_536  # Entries sampled to bracket the k-th magnitude (host path).
_STEP = 1 << 17  # Entries per step of the host pass (512 KB of float32 scratch: in the L2 cache).


def _host_group_stats(arrays, origins, k):
  """NumPy top-k statistics of one group: exact, with one full pass in the common case.

  A strided sample of |x − origin| gives a magnitude `lo` that at least k entries exceed with
  overwhelming probability; one pass keeps the entries >= lo (about k of n), and introselect runs
  on those alone. If the bracket fails (fewer than k entries >= lo: adversarial or tied data),
  it falls back to a partition of everything, so the result is exact either way.
  """
  n = sum(a.size for a in arrays)
  k = int(k)

  def diff(i, a, step=1):
    x = a.reshape(-1)[::step]
    if origins is None:
      return x.astype(np.float32, copy=False)
    return np.subtract(x, origins[i].reshape(-1)[::step], dtype=np.float32)

  step = max(1, n // _SAMPLE_SIZE)
  sample = np.abs(np.concatenate([diff(i, a, step) for i, a in enumerate(arrays)]))
  m = sample.size
  # The sample's expected count above the true threshold is m·k/n; go 6 sigma (+16) lower.
  expected = m * k / n
  margin = 6.0 * np.sqrt(max(expected * (1 - k / n), 1.0)) + 16
  rank = int(min(m, np.ceil(expected + margin)))
  lo = np.partition(sample, m - rank)[m - rank] if rank < m else np.float32(0)

  # Leaf by leaf, in steps of at most _STEP entries through scratch buffers that stay in the
  # cache (whole-leaf scratch, 2.4 MB per buffer for ViT-S's largest leaves, took 8% longer on
  # its 22M entries). np.compress, not boolean indexing: the latter is ~8x slower on a random
  # mask.
  # A k-th largest of 0 (vectors mostly zero, as after DARE's drop): keep only the nonzeros (zeros
  # add nothing to the sums), so the partition below never runs over the zeros.
  keep = np.greater if lo == 0 else np.greater_equal
  chunk = min(_STEP, max(a.size for a in arrays))
  diff_buf, mag_buf = np.empty((2, chunk), np.float32)
  mask_buf = np.empty(chunk, bool)
  signed = []
  for i, a in enumerate(arrays):
    flat = a.reshape(-1)
    origin = None if origins is None else origins[i].reshape(-1)
    for start in range(0, flat.size, chunk):
      size = min(chunk, flat.size - start)
      d, mag, mask = diff_buf[:size], mag_buf[:size], mask_buf[:size]
      if origin is None:
        d[...] = flat[start : start + size]
      else:
        np.subtract(
          flat[start : start + size], origin[start : start + size], out=d, dtype=np.float32
        )
      np.abs(d, out=mag)
      keep(mag, lo, out=mask)
      signed.append(np.compress(mask, d))
  candidates = np.concatenate(signed)
  if lo == 0 and candidates.size < k:  # Fewer than k nonzeros: the k-th largest is 0.
    kept_sign = float(np.sum(np.sign(candidates), dtype=np.float64))
    return np.float32(0.0), float(np.sum(candidates, dtype=np.float64)), kept_sign
  if candidates.size < k:  # Bracket failed: exact fallback over everything.
    candidates = np.concatenate([diff(i, a) for i, a in enumerate(arrays)])
  magnitude = np.abs(candidates)
  index = candidates.size - k
  threshold = np.partition(magnitude, index)[index]
  kept = magnitude >= threshold
  kept_sum = float(np.sum(candidates[kept], dtype=np.float64))
  kept_sign = float(np.sum(np.sign(candidates[kept]), dtype=np.float64))
  return threshold, kept_sum, kept_sign


def _stats_host(groups, origins, ks) -> TopKStats:
  sizes = [len(g) for g in groups]
  flat = [x for g in groups for x in g]
  # The same origin (θ0's leaves) usually serves every group: pass each distinct array once.
  unique, origin_index = [], []
  if origins is not None:
    seen = {}
    for g in origins:
      for x in g:
        if id(x) not in seen:
          seen[id(x)] = len(unique)
          unique.append(x)
        origin_index.append(seen[id(x)])

  def compute(outputs, ks, *arrays):
    xs, os_ = arrays[: len(flat)], arrays[len(flat) :]
    spans = list(itertools.pairwise(np.cumsum([0, *sizes])))  # Each group's leaves in `flat`.
    o = None if origins is None else [[os_[j] for j in origin_index[a:b]] for a, b in spans]
    for g, stats in enumerate(_host_groups_stats([xs[a:b] for a, b in spans], o, ks)):
      for out, value in zip(outputs, stats, strict=True):
        out[g] = value

  shape = jax.ShapeDtypeStruct((len(groups),), jnp.float32)
  out = host_call.host_call(compute, [shape] * 3, ks, *flat, *unique)
  return TopKStats(*out)


def _count_dtype(total: int):
  if jax.config.jax_enable_x64:
    return jnp.int64
  if total >= 2**31:
    raise NotImplementedError(
      f"Bisection selection over {total} entries needs 64-bit counts: enable "
      "jax.config.update('jax_enable_x64', True) or use method='host'."
    )
  return jnp.int32


def _stats_bisect(groups, origins, ks) -> TopKStats:
  thresholds, sums, signs = [], [], []
  for g, leaves in enumerate(groups):
    diffs = [
      x.astype(jnp.float32) if origins is None else x.astype(jnp.float32) - o.astype(jnp.float32)
      for x, o in zip(leaves, origins[g] if origins is not None else leaves, strict=True)
    ]
    threshold = _kth_bisect(diffs, ks[g])
    thresholds.append(threshold)
    sums.append(sum(jnp.sum(jnp.where(jnp.abs(d) >= threshold, d, 0.0)) for d in diffs))
    signs.append(sum(jnp.sum(jnp.where(jnp.abs(d) >= threshold, jnp.sign(d), 0.0)) for d in diffs))
  return TopKStats(jnp.stack(thresholds), jnp.stack(sums), jnp.stack(signs))


def _kth_bisect(leaves: list[jax.Array], k: jax.Array) -> jax.Array:
  dtype = _count_dtype(sum(x.size for x in leaves))
  bits = [lax.bitcast_convert_type(jnp.abs(x), jnp.int32) for x in leaves]

  def count_at_least(t):
    return sum(jnp.sum(b >= t, dtype=dtype) for b in bits)

  # Invariant: count(bits >= lo) >= k > count(bits >= hi). 31 halvings close a 2^31 gap.
  def body(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    enough = count_at_least(mid) >= k.astype(dtype)
    return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

  lo, _ = lax.fori_loop(0, 31, body, (jnp.int32(0), jnp.int32(_INF_BITS + 1)))
  return lax.bitcast_convert_type(lo, jnp.float32)


def kth_largest_magnitude_per_row(x: jax.Array, k: jax.Array | int) -> jax.Array:
  """Returns the k-th largest |x| along the last axis, for every row (bisection, any backend).

  Args:
    x: array of shape [..., m], NaN-free.
    k: 1 <= k <= m, may be traced.

  Returns:
    float32 array of shape [...].
  """
  bits = lax.bitcast_convert_type(jnp.abs(x.astype(jnp.float32)), jnp.int32)
  k = jnp.asarray(k, jnp.int32)
  shape = x.shape[:-1]

  def body(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    enough = jnp.sum(bits >= mid[..., None], axis=-1, dtype=jnp.int32) >= k
    return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

  init = (jnp.zeros(shape, jnp.int32), jnp.full(shape, _INF_BITS + 1, jnp.int32))
  lo, _ = lax.fori_loop(0, 31, body, init)
  return lax.bitcast_convert_type(lo, jnp.float32)


ROUNDINGS = ("round", "floor", "floor_min1")
# Relative nudge of a traced float32 count before flooring: d·n that is an integer in decimal
# (0.7 · 10) counts as that integer, as Python's float64 int() does, despite float32's rounding.
_FLOOR_NUDGE = 1.0 + 2.0**-21


def count_for_fraction(
  size: int, fraction: jax.Array | float, rounding: str = "round"
) -> jax.Array:
  """Returns how many of `size` entries a kept (or dropped) `fraction` means, as int32.

  Counting rules (who uses which):
    "round": clip(round(fraction · size), 1, size) (mergejax's default for TIES);
    "floor": clip(int(fraction · size), 0, size) (Python's `int()`, the Breadcrumbs reference
      and mergekit's outlier counts; may be 0);
    "floor_min1": clip(int(fraction · size), 1, size) (mergekit's `magnitude`: at least one kept).

  A concrete `fraction` (Python or NumPy number) is counted in float64 exactly as Python's
  `int(fraction * size)`. A traced one is float32: the floor is taken after a relative nudge of
  2^-21, so it matches Python's count whenever fraction · size < 2^21 (up to float64 artefacts
  such as int(0.57 * 100) = 56, counted 57 here).

  Args:
    size: number of entries (static).
    fraction: fraction, in [0, 1]; may be traced.
    rounding: one of `ROUNDINGS`.

  Returns:
    int32 scalar.
  """
  if rounding not in ROUNDINGS:
    raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}.")
  low = 0 if rounding == "floor" else 1
  if isinstance(fraction, int | float | np.number) and not isinstance(fraction, bool):
    product = float(fraction) * size
    k = round(product) if rounding == "round" else int(product)
    return jnp.asarray(min(max(k, low), size), jnp.int32)
  product = jnp.asarray(fraction, jnp.float32) * size
  if rounding == "round":
    k = jnp.round(product)
  else:
    k = jnp.floor(product * _FLOOR_NUDGE)
  return jnp.clip(k.astype(jnp.int32), low, size)
