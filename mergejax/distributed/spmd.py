"""A merge program made to run SPMD over a mesh, with the single-device bits.

`shard_program(program, layout, args)` wraps a data-free merge program (the `rules.merge` front
door's, or one leaf's in the streaming engine) for inputs placed by a `LeafSharding`:

* It traces under `selection.across_devices()`, so exact top-k selection (TIES's threshold) runs
  as a bisection whose counts XLA sums across devices (all-reduces of integers: exact), rather
  than as a host callback that would gather every operand onto one device.
* `exactness.order_dependent_outputs` decides how it runs. If no output's bits depend on how the
  leaves are split (elementwise rules, counts, sorts, the comparisons of TIES's sign election),
  XLA partitions the whole program: every device computes its slices ("partitioned"). If some do
  (EMR's rescalers, Model Stock's and SLERP's per-leaf cosines, DARE's L1 rescale, the SVDs of
  TSV/ISO), the leaves are gathered (replicated) first, every device runs the single-device
  program on whole leaves, and the outputs are split again ("gathered"): the same bits, at the
  cost of the memory of whole leaves (the streaming engine gathers one leaf at a time). The gather
  and the split are programs of their own: inside one program XLA gives gathered leaves other
  physical layouts, which changes the order of the sums it was meant to keep.
  `LeafSharding(exact=False)` partitions those too: XLA then sums across devices in its own
  order, and the results agree with one device to float32 rounding instead of bit for bit.
* Outputs are constrained to their `LeafSharding` placement (a function of shape), so a merged
  tree comes back split like its inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from mergejax import selection
from mergejax.distributed import exactness
from mergejax.distributed.layout import LeafSharding, put

PARTITIONED, GATHERED = "partitioned", "gathered"


def _abstract(x: Any) -> Any:
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype)


def split_flags(layout: LeafSharding, args: Sequence[Any], num_split_args: int) -> list[bool]:
  """One flag per flat leaf of `args`: split over devices (the first `num_split_args` arguments
  hold the models' leaves; the rest, statistics and hyper-parameters, are replicated)."""
  head = [layout.is_split(np.shape(x)) for x in jax.tree.leaves(args[:num_split_args])]
  return head + [False] * len(jax.tree.leaves(args[num_split_args:]))


def choose_mode(
  program: Callable[..., Any], layout: LeafSharding, args: Sequence[Any], num_split_args: int = 2
) -> str:
  """PARTITIONED or GATHERED for `program(*args)` on `layout` (see the module docstring)."""
  flags = split_flags(layout, args, num_split_args)
  if not layout.exact or not any(flags):
    return PARTITIONED
  with selection.across_devices():
    abstract = jax.tree.map(_abstract, tuple(args))
    dependent = exactness.order_dependent_outputs(program, abstract, flags)
  return GATHERED if any(dependent) else PARTITIONED


def constrain(tree: Any, layout: LeafSharding) -> Any:
  """Every leaf of `tree` constrained to its `layout` placement (inside jit)."""
  return jax.tree.map(
    lambda x: jax.lax.with_sharding_constraint(x, layout.sharding(np.shape(x))), tree
  )


class ShardedProgram:
  """A merge program compiled for a `LeafSharding` (see the module docstring); call it on
  arguments whose first `num_split_args` hold leaves placed by `layout.place`."""

  def __init__(self, program, layout: LeafSharding, mode: str, num_split_args: int):
    if mode not in (PARTITIONED, GATHERED):
      raise ValueError(f"mode must be {PARTITIONED!r} or {GATHERED!r}, got {mode!r}.")
    self.layout, self.mode, self.num_split_args = layout, mode, num_split_args

    def traced(*a):
      with selection.across_devices():
        out = program(*a)
      return constrain(out, layout) if mode == PARTITIONED else out

    # Gathered: the single-device program on replicated inputs; XLA has nothing to split, so
    # every device computes exactly what one device would (whole leaves in their usual layout).
    self.jitted = jax.jit(traced)

  def _inputs(self, args):
    if self.mode == PARTITIONED:
      return args
    n, replicated = self.num_split_args, self.layout.replicated()
    whole = jax.tree.map(lambda x: put(x, replicated), tuple(args[:n]))
    return (*whole, *args[n:])

  def __call__(self, *args):
    out = self.jitted(*self._inputs(args))
    if self.mode == PARTITIONED:
      return out
    return jax.tree.map(lambda x: put(x, self.layout.sharding(np.shape(x))), out)

  def lower(self, *args):
    """`jax.stages.Lowered` of the program (gathered: of the replicated computation)."""
    return self.jitted.lower(*self._inputs(args))


def shard_program(
  program: Callable[..., Any],
  layout: LeafSharding,
  args: Sequence[Any],
  *,
  num_split_args: int = 2,
  mode: str | None = None,
) -> ShardedProgram:
  """`program` compiled to run on `layout`'s mesh with the single-device bits.

  Args:
    program: a pure merge program, e.g. `(base, experts, stats, traced) -> (merged, report)`.
    layout: where the models' leaves are.
    args: example arguments (arrays or ShapeDtypeStructs) of the shapes it will be called with
      (unused when `mode` is given).
    num_split_args: how many leading arguments hold leaves placed by `layout`.
    mode: force PARTITIONED or GATHERED (None: `choose_mode`).

  Returns:
    A `ShardedProgram`: call it (or `.lower` it) with placed arguments.
  """
  if mode is None:
    mode = choose_mode(program, layout, args, num_split_args)
  return ShardedProgram(program, layout, mode, num_split_args)
