"""Where each leaf lives on a `jax.sharding.Mesh`: one rule, a function of the leaf's shape.

`LeafSharding` splits a leaf along its leading axis that the number of shards divides (with at
least two entries per shard along it) and replicates leaves that are small or have no such axis.
Because the placement depends on the shape alone, inputs, outputs and intermediate trees of one
shape get the same `NamedSharding`, and a tree placed on one mesh restores onto another by
asking the other mesh's `LeafSharding` (orbax reshards on reading).

`put` places host data without a whole-array copy per process: a NumPy (or memory-mapped) leaf
becomes a global array through `jax.make_array_from_callback`, which reads only the slices of
the devices this process owns. In a multi-host run each host thus reads only its own parts of
the checkpoint files (replicated leaves, small by construction, are read whole).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA, MODEL = "data", "model"  # The axes of the learned-merging mesh.
MIN_SHARDED_SIZE = 1 << 12  # Leaves with fewer entries are replicated (biases, norms, scalars).


@dataclasses.dataclass(frozen=True)
class LeafSharding:
  """How a tree's leaves are split over a mesh (hashable: a jit cache key).

  Attributes:
    mesh: the devices.
    axes: the mesh axes a leaf is split over (None: all of them, i.e. every device holds
      1 / mesh.size of a split leaf).
    min_size: leaves with fewer entries are replicated.
    exact: data-free merges give the single-device bits (see `mergejax.distributed.spmd`); False
      lets XLA reduce across devices in its own order (faster for rules with per-leaf sums).
  """

  mesh: Mesh
  axes: tuple[str, ...] | None = None
  min_size: int = MIN_SHARDED_SIZE
  exact: bool = True

  def __post_init__(self):
    unknown = [a for a in self.axis_names if a not in self.mesh.axis_names]
    if unknown:
      raise ValueError(f"LeafSharding axes {unknown} are not mesh axes {self.mesh.axis_names}.")

  @property
  def axis_names(self) -> tuple[str, ...]:
    return tuple(self.mesh.axis_names) if self.axes is None else tuple(self.axes)

  @property
  def num_shards(self) -> int:
    return math.prod(self.mesh.shape[a] for a in self.axis_names)

  def spec(self, shape: Sequence[int]) -> P:
    """The `PartitionSpec` of a leaf of `shape`: its leading divisible axis split, or P()."""
    n = self.num_shards
    if n == 1 or math.prod(shape) < self.min_size:
      return P()
    # The leading axis whose slices keep at least two entries along it: a host's part of a
    # row-major file is then one byte range, and no device sees a size-1 axis where one device
    # saw a longer one (XLA simplifies degenerate axes differently, which changes roundings).
    candidates = [a for a in range(len(shape)) if shape[a] % n == 0 and shape[a] >= 2 * n]
    if not candidates:
      return P()
    axis = candidates[0]
    names = self.axis_names[0] if len(self.axis_names) == 1 else self.axis_names
    return P(*([None] * axis), names)

  def sharding(self, shape: Sequence[int]) -> NamedSharding:
    """The `NamedSharding` of a leaf of `shape`."""
    return NamedSharding(self.mesh, self.spec(shape))

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def is_split(self, shape: Sequence[int]) -> bool:
    return self.spec(shape) != P()

  def place(self, tree: Any) -> Any:
    """Every leaf of `tree` on the mesh with its `sharding` (see `put`)."""
    return jax.tree.map(lambda x: put(x, self.sharding(np.shape(x))), tree)

  def abstract(self, tree: Any) -> Any:
    """`jax.ShapeDtypeStruct`s of `tree`'s leaves carrying their shardings (orbax restores)."""
    return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=self.sharding(np.shape(x))),
      tree,
    )


def put(x: Any, sharding: NamedSharding) -> jax.Array:
  """`x` as a global array with `sharding`, reading only this process's slices of host data.

  Args:
    x: a jax array (resharded if needed) or an array-like (NumPy, memory map, lazy leaf).
    sharding: where it goes.

  Returns:
    A `jax.Array` with `sharding`; floating dtypes are canonicalized as `jnp.asarray` would
    (float64 becomes float32 unless x64 is on), integer leaves keep what jax allows.
  """
  if isinstance(x, jax.Array):
    if x.sharding == sharding:
      return x
    if not x.is_fully_addressable:
      return jax.jit(lambda a: a, out_shardings=sharding)(x)
    if sharding.is_fully_addressable:
      return jax.device_put(x, sharding)
    x = np.asarray(x)  # This process's copy of the whole array: place its own slices.
  dtype = jax.dtypes.canonicalize_dtype(np.dtype(x.dtype))
  shape = tuple(np.shape(x))

  def read(index):
    return np.asarray(x[index] if shape else x, dtype=dtype)

  return jax.make_array_from_callback(shape, sharding, read)


def make_mesh(
  *, data: int | None = None, model: int = 1, devices: Sequence[Any] | None = None
) -> Mesh:
  """The ("data", "model") mesh of learned merging; data=None puts every other device on "data".

  Args:
    data: devices along the data axis (task batches split); None: len(devices) // model.
    model: devices along the model axis (θ0 and the basis split FSDP-style).
    devices: the devices (default: `jax.devices()`, every process's).

  Returns:
    A `Mesh` of shape (data, model).

  Raises:
    ValueError: naming `mesh.data` / `mesh.model` when they do not tile the devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  if model < 1 or len(devices) % model:
    raise ValueError(
      f"mesh.model={model} must be a positive divisor of the device count ({len(devices)})."
    )
  data = len(devices) // model if data is None else int(data)
  if data < 1 or data * model != len(devices):
    raise ValueError(
      f"mesh.data={data} x mesh.model={model} must equal the device count ({len(devices)}); "
      "leave mesh.data unset to put every other device on the data axis."
    )
  return Mesh(np.asarray(devices).reshape(data, model), (DATA, MODEL))


def merge_mesh(devices: int | None = None) -> Mesh | None:
  """The 1-D mesh a data-free merge splits leaves over, or None for the single-device path.

  Args:
    devices: how many devices (None: every device of every process; 1: None is returned).

  Returns:
    A `Mesh` with one axis, "model", or None.
  """
  available = jax.devices()
  n = len(available) if devices is None else int(devices)
  if n < 1 or n > len(available):
    raise ValueError(f"mesh.devices={devices}: expected 1 to {len(available)} (None: all).")
  if n == 1 and jax.process_count() == 1:
    return None
  return Mesh(np.asarray(available[:n]), (MODEL,))


def describe(mesh: Mesh | None) -> dict[str, Any]:
  """What run.json records of a mesh: its shape, the device count and the process count."""
  shape = {"devices": 1} if mesh is None else {str(k): int(v) for k, v in mesh.shape.items()}
  return {
    "mesh_shape": shape,
    "device_count": 1 if mesh is None else int(mesh.size),
    "process_count": jax.process_count(),
    "platform": jax.default_backend(),
  }
