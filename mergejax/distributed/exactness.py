"""Which outputs of a program may change bits when XLA splits its inputs across devices.

Splitting a leaf over devices leaves every elementwise operation, comparison, sort, integer sum
and max bit for bit as it was: each entry is computed from the same entries in the same way. A
floating-point *sum* over a split axis is not: XLA adds each device's part, then the parts, so
the order of additions (and the rounding) depends on the device count. The same holds for dot
products, cumulative sums and linear algebra (SVD, ...).

`order_dependent_outputs` traces a program to a jaxpr and follows every value: one computed by
such a reduction from split data is *rounded*; arithmetic on a rounded value is rounded; a
comparison of it (`total < 0`, `sgn`) is a *decision*, which differs only when the value sits
within rounding of the compared one (TIES's election fallback looks at the sign of a whole-model
sum: exact unless that sum is ~0, and then only where the per-entry vote is an exact tie).
Scalars are never split; the analysis is conservative everywhere else (any axis of a split
operand counts as split; control flow merges the flags of all its inputs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import core as jax_core

# Primitives whose floating-point result depends on the order its inputs are combined in.
ORDER_DEPENDENT = frozenset(
  {
    "reduce_sum",
    "reduce_prod",
    "reduce",
    "dot_general",
    "conv_general_dilated",
    "cumsum",
    "cumprod",
    "cumlogsumexp",
    "reduce_precision",
    "pure_callback",
    "buffer_callback",
    "svd",
    "eigh",
    "eig",
    "qr",
    "lu",
    "cholesky",
    "triangular_solve",
    "householder_product",
    "geqrf",
    "tridiagonal",
    "tridiagonal_solve",
    "schur",
    "hessenberg",
  }
)
# Their outputs are decisions (booleans or signs): exact unless a rounded input is a near-tie.
DECISIONS = frozenset({"lt", "le", "gt", "ge", "eq", "ne", "sign", "is_finite"})


class _Flags:
  """Per value: split (may live on several devices) and rounded (see the module docstring)."""

  __slots__ = ("rounded", "split")

  def __init__(self, split: bool = False, rounded: bool = False):
    self.split, self.rounded = split, rounded


_CLEAN = _Flags()


def _sub_jaxprs(params: dict) -> list[Any]:
  found = []
  for value in params.values():
    for item in value if isinstance(value, tuple | list) else (value,):
      if isinstance(item, jax_core.ClosedJaxpr):
        found.append(item.jaxpr)
      elif isinstance(item, jax_core.Jaxpr):
        found.append(item)
  return found


def _float(aval: Any) -> bool:
  dtype = getattr(aval, "dtype", None)
  return dtype is not None and np.issubdtype(dtype, np.inexact)


def _run(jaxpr: Any, inputs: Sequence[_Flags]) -> list[_Flags]:
  env: dict[Any, _Flags] = dict(zip(jaxpr.invars, inputs, strict=True))

  def read(v):
    return env.get(v, _CLEAN) if isinstance(v, jax_core.Var) else _CLEAN

  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    split_in = any(f.split for f in ins)
    rounded_in = any(f.rounded for f in ins)
    subs = _sub_jaxprs(eqn.params)
    name = eqn.primitive.name
    if subs and all(len(s.invars) == len(ins) for s in subs):
      # jit, custom_jvp/vjp calls, remat, cond branches: follow each sub-program, merge outputs.
      results = [_run(s, ins) for s in subs]
      outs = [
        _Flags(any(r[i].split for r in results), any(r[i].rounded for r in results))
        for i in range(len(eqn.outvars))
      ]
    elif subs:
      # while / scan: carries feed back, so every input's flags reach every sub-program input.
      results = [_run(s, [_Flags(split_in, rounded_in)] * len(s.invars)) for s in subs]
      split = split_in or any(f.split for r in results for f in r)
      rounded = rounded_in or any(f.rounded for r in results for f in r)
      outs = [_Flags(split, rounded) for _ in eqn.outvars]
    elif name in DECISIONS:
      outs = [_Flags(split_in, False) for _ in eqn.outvars]
    else:
      accumulates = name in ORDER_DEPENDENT and split_in
      outs = [_Flags(split_in, rounded_in or (accumulates and _float(v.aval))) for v in eqn.outvars]
    for v, f in zip(eqn.outvars, outs, strict=True):
      f.split = f.split and bool(getattr(v.aval, "shape", ()))  # A scalar is never split.
      env[v] = f
  return [read(v) for v in jaxpr.outvars]


def order_dependent_outputs(
  fn: Callable[..., Any], args: Sequence[Any], split: Sequence[bool]
) -> list[bool]:
  """For each flat output of `fn(*args)`, whether its bits may depend on how inputs are split.

  Args:
    fn: a jax-traceable function.
    args: its arguments (arrays or `jax.ShapeDtypeStruct`s).
    split: one flag per flat input leaf of `args`: whether it is split over devices.

  Returns:
    One flag per flat output leaf.
  """
  closed = jax.make_jaxpr(fn)(*args)
  flags = [_Flags(bool(s)) for s in split]
  if len(flags) != len(closed.jaxpr.invars):
    raise ValueError(f"{len(flags)} split flags for {len(closed.jaxpr.invars)} inputs.")
  return [f.rounded for f in _run(closed.jaxpr, flags)]
