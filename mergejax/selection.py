"""Exact k-th largest magnitude over many leaves, inside jit, on any backend.

Magnitude top-k is the heart of TIES, Breadcrumbs and friends. Two exact implementations:

* "host": a `jax.pure_callback` to NumPy's introselect (`ndarray.partition`). On CPU this is
  30-50x faster than XLA's sort/top_k at 22M entries (about 30 ms per 22M-entry vector).
* "bisect": a bisection on the float32 bit pattern. For x >= 0 the int32 view of a float32 is
  monotone in x, so 31 counting passes pin down the exact bit pattern of the k-th largest value.
  Pure XLA (fused compare+sum), so it runs inside jit on GPU/TPU with no host round trip.

"auto" picks "host" when lowering for CPU and "bisect" elsewhere (`lax.platform_dependent`).
Both return the same value, bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_INF_BITS = 0x7F800000  # Bit pattern of +inf; NaN is excluded by validation.


def kth_largest_magnitude(
  leaves: Sequence[jax.Array], k: jax.Array | int, *, method: str = "auto"
) -> jax.Array:
  """Returns the k-th largest |x| over all entries of all `leaves`, as a float32 scalar.

  Keeping `|x| >= kth_largest_magnitude(leaves, k)` keeps the top k entries plus any that tie
  with the k-th (the TIES paper's convention).

  Args:
    leaves: arrays of any shapes and float dtypes (cast to float32); NaN-free.
    k: 1 <= k <= total size; may be traced (changing it does not recompile).
    method: "auto", "host" (NumPy callback) or "bisect" (pure XLA).

  Returns:
    A float32 scalar.

  >>> float(kth_largest_magnitude([jnp.array([3.0, -5.0]), jnp.array([1.0])], 2))
  3.0
  """
  leaves = [jnp.asarray(x, jnp.float32) for x in leaves]
  k = jnp.asarray(k, jnp.int32)
  if method == "host":
    return _kth_host(leaves, k)
  if method == "bisect":
    return _kth_bisect(leaves, k)
  if method == "auto":
    return lax.platform_dependent(leaves, k, cpu=_kth_host, default=_kth_bisect)
  raise ValueError(f"method must be 'auto', 'host' or 'bisect', got {method!r}.")


def _kth_host(leaves: list[jax.Array], k: jax.Array) -> jax.Array:
  def select(k, *arrays):
    n = sum(a.size for a in arrays)
    # One buffer for |x| of every leaf; partition in place (no further copy).
    buf = np.empty(n, np.float32)
    offset = 0
    for a in arrays:
      np.abs(np.asarray(a).reshape(-1), out=buf[offset : offset + a.size])
      offset += a.size
    index = n - int(k)
    buf.partition(index)
    return np.asarray(buf[index], np.float32)

  return jax.pure_callback(
    select, jax.ShapeDtypeStruct((), jnp.float32), k, *leaves, vmap_method="sequential"
  )


def _count_dtype(total: int):
  if jax.config.jax_enable_x64:
    return jnp.int64
  if total >= 2**31:
    raise NotImplementedError(
      f"Bisection selection over {total} entries needs 64-bit counts: enable "
      "jax.config.update('jax_enable_x64', True) or use method='host'."
    )
  return jnp.int32


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


def count_for_fraction(size: int, fraction: jax.Array | float) -> jax.Array:
  """Returns k = clip(round(fraction * size), 1, size) as int32 (traced if `fraction` is).

  Args:
    size: number of entries (static).
    fraction: fraction to keep, in (0, 1].

  Returns:
    int32 scalar.
  """
  k = jnp.round(jnp.asarray(fraction, jnp.float32) * size).astype(jnp.int32)
  return jnp.clip(k, 1, size)
