"""Learned merging on a ("data", "model") mesh.

θ0 and the basis vectors are split over the "model" axis, FSDP-style (each leaf along its leading
axis, `distributed.LeafSharding`; XLA gathers what a layer's forward needs), each task's batch
over the "data" axis, and the coefficients, the optimizer state and the data sets are replicated.
`config.mesh` gives the shape (`data`, `model`; `data` unset: every device not on the model axis);
a single device keeps the single-device path unchanged.

The loss is a mean over the batch and Λ's gradient a sum over every entry of θ, so XLA adds
partial sums across devices: a few steps agree with one device to float32 rounding (the tests
state the tolerance), not bit for bit.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mergejax.distributed import layout


def make_mesh(config: Any) -> Mesh | None:
  """The run's mesh from `config.mesh` (None: one device, the single-device path).

  Args:
    config: a recipe; `config.mesh` holds `data` (None: every device not on the model axis) and
      `model` (default 1). A recipe without `mesh` runs on every device along "data".

  Returns:
    A ("data", "model") `Mesh`, or None when it would hold one device.
  """
  fields = config.get("mesh") or {}
  data, model = fields.get("data"), fields.get("model", 1)
  mesh = layout.make_mesh(data=data, model=model or 1)
  return None if mesh.size == 1 else mesh


def describe(mesh: Mesh | None) -> dict[str, Any]:
  """What a run records of its mesh (shape, device and process counts)."""
  return layout.describe(mesh)


class Placement:
  """Where the learned loop's arrays live on `mesh` (see the module docstring)."""

  def __init__(self, mesh: Mesh):
    self.mesh = mesh
    self.params = layout.LeafSharding(mesh, axes=(layout.MODEL,))
    self.replicated_sharding = NamedSharding(mesh, P())

  def model(self, tree: Any) -> Any:
    """θ0-shaped trees (θ0, basis vectors) split over "model"."""
    return self.params.place(tree)

  def replicated(self, tree: Any) -> Any:
    """Coefficients, optimizer state, data: a copy on every device."""
    return jax.tree.map(lambda x: layout.put(x, self.replicated_sharding), tree)

  def constrain_model(self, tree: Any) -> Any:
    """Inside jit: θ(Λ) split like θ0."""
    return jax.tree.map(
      lambda x: jax.lax.with_sharding_constraint(x, self.params.sharding(np.shape(x))), tree
    )

  def constrain_batch(self, batch: Any) -> Any:
    """Inside jit: a task's batch split over "data" along its example axis.

    Raises:
      ValueError: a batch the data axis does not divide (naming `mesh.data`).
    """
    size = self.mesh.shape[layout.DATA]

    def one(x):
      if x.shape[0] % size:
        raise ValueError(
          f"A batch of {x.shape[0]} examples does not split over mesh.data={size} devices: "
          "make train.batch_size a multiple of mesh.data."
        )
      return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, P(layout.DATA)))

    return jax.tree.map(one, batch)

  def key(self) -> tuple[int, int]:
    """The mesh shape, for compile-cache keys."""
    return int(self.mesh.shape[layout.DATA]), int(self.mesh.shape[layout.MODEL])
