"""Merges and coefficient searches across devices and hosts, with `jax.sharding`.

* `layout`: `LeafSharding` (each leaf split along its leading axis the shard count divides,
  small leaves replicated; a function of the shape alone), `put` (host data onto the mesh, each
  process reading only its slices), `make_mesh` (the learned loop's ("data", "model") mesh),
  `merge_mesh` (the 1-D mesh of data-free merges), `describe` (what run.json records).
* `exactness`: which outputs of a program may change bits when its inputs are split.
* `spmd`: `shard_program`, a merge program run SPMD with the single-device bits.
* `hosts`: `jax.distributed.initialize` from a config, the primary process, host copies.
* `comms`: bytes a compiled program's collectives move.

`rules.merge(..., mesh=mesh)`, `streaming.StreamingMerge(..., mesh=...)` and the learned loop
(`config.mesh`) build on these.
"""

from mergejax.distributed.layout import (
  DATA,
  MODEL,
  LeafSharding,
  describe,
  make_mesh,
  merge_mesh,
  put,
)
from mergejax.distributed.spmd import GATHERED, PARTITIONED, choose_mode, shard_program

__all__ = [
  "DATA",
  "GATHERED",
  "MODEL",
  "PARTITIONED",
  "LeafSharding",
  "choose_mode",
  "describe",
  "make_mesh",
  "merge_mesh",
  "put",
  "shard_program",
]
