"""NumPy inside jit on CPU, reading XLA's buffers in place.

`jax.pure_callback` hands its callback a copy of every operand (on this 2-core machine a 128 MB
bf16 operand took 0.6-1.3 s to hand over and held two extra copies in memory meanwhile).
`buffer_callback` (jax.experimental, CPU and GPU) gives NumPy views of XLA's own buffers instead:
0.07 s for the same operand, nothing copied. `host_call` uses it where this jax has it and
falls back to `jax.pure_callback` elsewhere; the host function is written once, against NumPy
arrays, and fills its outputs in place.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np
from jax import lax

try:
  from jax.experimental.buffer_callback import buffer_callback
except ImportError:  # An older or newer jax without it: copies, same results.
  buffer_callback = None


_STATE = threading.local()


@contextlib.contextmanager
def thread_flag(state: threading.local, name: str) -> Iterator[None]:
  """Within: `state.<name>` is True in this thread; restored after (nested uses included)."""
  previous = getattr(state, name, False)
  setattr(state, name, True)
  try:
    yield
  finally:
    setattr(state, name, previous)


def lowering_for_cpu() -> contextlib.AbstractContextManager[None]:
  """Within (in this thread, while tracing a program compiled for the CPU alone): `on_cpu_or`
  traces the CPU branch only. `lax.platform_dependent` traces every branch: Breadcrumbs' other
  one, a bisection, took ~45% of its per-leaf program's tracing. jax caches traces per function,
  not per this state: trace within only functions of their own (the streaming engine's fresh
  per-leaf programs, `rules.merge`'s jit for the CPU)."""
  return thread_flag(_STATE, "cpu")


def on_cpu_or(*operands, cpu: Callable, default: Callable):
  """`cpu(*operands)` on the CPU backend, else `default(*operands)`: `lax.platform_dependent`,
  or `cpu` alone within `lowering_for_cpu`."""
  if getattr(_STATE, "cpu", False):
    return cpu(*operands)
  return lax.platform_dependent(*operands, cpu=cpu, default=default)


def host_call(
  fill: Callable[..., None],
  results: Sequence[jax.ShapeDtypeStruct],
  *operands: jax.Array,
) -> list[jax.Array]:
  """Runs `fill(outputs, *operands)` on NumPy arrays, from inside a CPU program.

  Args:
    fill: writes every array of `outputs` (a list of NumPy arrays shaped as `results`) from the
      NumPy `operands`, which it must not modify. It runs on XLA's thread (with XLA's
      floating-point mode: subnormals flushed to zero), and may start threads of its own.
    results: the outputs' shapes and dtypes.
    *operands: arrays; under `jax.vmap` the call is repeated per batch entry.

  Returns:
    The outputs as jax arrays.
  """
  results = list(results)
  if buffer_callback is not None:

    def on_buffers(ctx, outputs, *buffers):
      del ctx
      fill([np.asarray(o) for o in outputs], *[np.asarray(b) for b in buffers])

    call = buffer_callback(on_buffers, results, vmap_method="sequential")
    return list(call(*operands))

  def on_copies(*arrays):
    outputs = [np.empty(r.shape, r.dtype) for r in results]
    fill(outputs, *[np.asarray(a) for a in arrays])
    return outputs

  return list(jax.pure_callback(on_copies, results, *operands, vmap_method="sequential"))
