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
  TSV/ISO), each process gathers whole leaves onto its first device, runs the very program
  `rules.merge` compiles for one device, and splits the outputs over the mesh ("gathered"): the
  same bits by construction, at the cost of whole leaves on one device (the streaming engine
  gathers one leaf at a time). Gathering inside one SPMD program is not enough: XLA gives the
  gathered leaves other layouts and simplifies the program differently, which changes the
  roundings it was meant to keep.
  `LeafSharding(exact=False)` partitions those too: XLA then sums across devices in its own
  order, and the results agree with one device to float32 rounding instead of bit for bit.
* Outputs are constrained to their `LeafSharding` placement (a function of shape), so a merged
  tree comes back split like its inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mergejax import selection
from mergejax.distributed import exactness, hosts
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


def _scalars(tree: Any) -> list[Any]:
  """The floating scalars of `tree`, returned by partitioned programs to give each a second use.

  XLA's CPU simplifier rewrites `x / broadcast(s)` as `x * broadcast(1 / s)` (one rounding
  more) when `s` has a single use. JAX's lowering gives a hyper-parameter one broadcast per
  operation, so a single-device program seldom qualifies; after SPMD partitioning the
  broadcasts are merged first and DARE's `x / density` did. A second use keeps the division.
  """
  return [
    x for x in jax.tree.leaves(tree) if np.ndim(x) == 0 and jnp.issubdtype(x.dtype, jnp.floating)
  ]


class ShardedProgram:
  """A merge program compiled for a `LeafSharding` (see the module docstring); call it with
  the models' leaves (host data or arrays placed by `layout.place`) as the first
  `num_split_args` arguments."""

  def __init__(self, program, layout: LeafSharding, mode: str, num_split_args: int):
    if mode not in (PARTITIONED, GATHERED):
      raise ValueError(f"mode must be {PARTITIONED!r} or {GATHERED!r}, got {mode!r}.")
    self.layout, self.mode, self.num_split_args = layout, mode, num_split_args
    self.compiled = None

    def partitioned(*a):
      with selection.across_devices():
        out = program(*a)
      # Every scalar input also leaves as an output: see `_scalars`.
      return constrain(out, layout), _scalars(a[num_split_args:])

    # Gathered: the very program `rules.merge` compiles, for one device (the first of this
    # process), on whole leaves; its outputs are then split over the mesh.
    self.jitted = jax.jit(partitioned if mode == PARTITIONED else program)

  def _inputs(self, args):
    """The models' leaves placed for this mode (host data, placed arrays or abstract ones)."""
    n = self.num_split_args
    device = jax.local_devices()[0]

    def place(x):
      if self.mode == PARTITIONED:
        sharding = self.layout.sharding(np.shape(x))
        if isinstance(x, jax.ShapeDtypeStruct):
          return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
        return put(x, sharding)
      if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, x.dtype)
      if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = hosts.to_host(x)
      return jax.device_put(x, device)

    return (*jax.tree.map(place, tuple(args[:n])), *args[n:])

  def __call__(self, *args):
    out = (self.compiled or self.jitted)(*self._inputs(args))
    if self.mode == PARTITIONED:
      return out[0]
    return jax.tree.map(lambda x: put(x, self.layout.sharding(np.shape(x))), out)

  def lower(self, *args):
    """`jax.stages.Lowered` of the program (gathered: of the single-device computation)."""
    return self.jitted.lower(*self._inputs(args))

  def compile(self, *args):
    """Compiles ahead of time for these arguments (abstract ones allowed); calls then use it.

    Returns:
      The `jax.stages.Compiled` (its `memory_analysis()` is per device).
    """
    self.compiled = self.lower(*args).compile()
    return self.compiled


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
