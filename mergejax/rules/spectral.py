"""Spectral rules: TSV-M / TSV-C (Task Singular Vectors) and ISO-C / ISO-CTS (isotropic merging).

Each works per weight matrix on the singular vectors of the task matrices Δt = θt − θ0 (one
`jnp.linalg.svd` per task matrix: `_svd` says why not one batched call) and is a pure, jit-able
function of (base, experts). On CPU, merges run them with one BLAS thread (`lapack=True`).

Which leaves are matrices (`matrices`, static):
* "2d" (default, as the reference code): exactly the 2-D leaves. Leaves of rank 0, 1 or ≥ 3
  (biases, norms, convolution or DenseGeneral kernels) are non-matrices.
* "merge_leading": 2-D leaves, and leaves of rank ≥ 3 reshaped to [∏ shape[:-1], shape[-1]]
  (a flax conv kernel [kh, kw, in, out] becomes [kh·kw·in, out], torch's [out, in·kh·kw] up to
  a transpose and a row permutation, neither of which changes the result; DenseGeneral output
  projections [heads, head_dim, d] become [heads·head_dim, d]).
* "merge_trailing": rank ≥ 3 reshaped to [shape[0], ∏ shape[1:]] (DenseGeneral q/k/v kernels
  [d, heads, head_dim] become [d, heads·head_dim]).
Non-matrix leaves get the mean of the task vectors, θ0 + α · mean τt (`non_matrix="mean"`, what
the authors' code and FusionBench do), or task arithmetic's sum (`non_matrix="sum"`).

Layout. flax kernels are [in, out], torch weights [out, in]. TSV-M, TSV-C and ISO-C are
transpose-invariant (the SVD of Δᵀ is V Σ Uᵀ, and every step maps through the transpose), so
they give the same result in either layout. ISO-CTS is not: it removes the common subspace from
each task on the output side (torch's left singular vectors). `layout="flax"` (default, flax)
does that on the kernel's columns, so a flax model merges as its torch twin does in the
reference; pass `layout="torch"` for trees holding torch-layout weights.

Arithmetic is float32; outputs have the dtypes of `base`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mergejax import tree as tree_lib
from mergejax.rules import spec
from mergejax.rules.task_specific import TaskSpecificMerge
from mergejax.tree import Params, to_compute

MATRICES = ("2d", "merge_leading", "merge_trailing")
NON_MATRIX = ("mean", "sum")
LAYOUTS = ("flax", "torch")


def matrix_shape(shape: tuple[int, ...], matrices: str = "2d") -> tuple[int, int] | None:
  """Returns the 2-D shape a leaf is treated as, or None if it is not a matrix.

  Args:
    shape: the leaf's shape.
    matrices: "2d", "merge_leading" or "merge_trailing" (see the module docstring).

  Returns:
    (rows, cols) or None.
  """
  if matrices not in MATRICES:
    raise ValueError(f"matrices must be one of {MATRICES}, got {matrices!r}.")
  if len(shape) == 2:
    return tuple(shape)
  if len(shape) < 2 or matrices == "2d":
    return None
  if matrices == "merge_leading":
    return math.prod(shape[:-1]), shape[-1]
  return shape[0], math.prod(shape[1:])


def _svd(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`jnp.linalg.svd(x, full_matrices=False)` with one LAPACK call per matrix of a batch.

  jaxlib 0.10's CPU kernel fans a batch out over XLA's intra-op thread pool and blocks its pool
  thread until the batch is done: once as many batched SVDs run at once as the pool has threads
  (2 on a 2-core machine: TSV-M or ISO-CTS on a single ViT block), none is left to run the
  batches and the process hangs at 0% CPU. Matrix by matrix, the same LAPACK routine on the same
  matrices gives the same bits, and no pool thread waits on another.
  """
  if x.ndim == 2:
    u, s, vt = jnp.linalg.svd(x, full_matrices=False)
    # LAPACK's divide and conquer (gesdd) can fail to converge and then returns NaNs (seen on a
    # near-singular 256x256 ISO-CTS basis, under jit only); QR iteration (gesvd) is slower but
    # robust. Computed only for a failed matrix, so successful SVDs keep their bits.
    failed = ~(jnp.isfinite(s).all() & jnp.isfinite(u).all() & jnp.isfinite(vt).all())
    return jax.lax.cond(
      failed & jnp.isfinite(x).all(),
      lambda: tuple(
        jax.lax.linalg.svd(x, full_matrices=False, algorithm=jax.lax.linalg.SvdAlgorithm.QR)
      ),
      lambda: (u, s, vt),
    )
  parts = [_svd(m) for m in x]
  u, s, vt = (jnp.stack(p) for p in zip(*parts, strict=True))
  return u, s, vt


def _polar(x: jax.Array) -> jax.Array:
  """The nearest matrix with orthonormal columns (or rows): P Qᵀ from x = P Σ Qᵀ."""
  p, _, qt = _svd(x)
  return p @ qt


def _per_leaf(base, experts, matrices, non_matrix, on_matrix, scale):
  """θ0 + α·Δ per leaf: Δ = on_matrix(path, stacked [T, m, n] task matrices) on matrices."""

  def leaf(path, b, *xs):
    b32 = to_compute(b)
    taus = [to_compute(x) - b32 for x in xs]
    shape2 = matrix_shape(b.shape, matrices)
    if shape2 is None:
      delta = sum(taus[1:], taus[0])
      if non_matrix == "mean":
        delta = delta / len(taus)
    else:
      stacked = jnp.stack([t.reshape(shape2) for t in taus])
      delta = on_matrix(tree_lib.path_str(path), stacked).reshape(b.shape)
    return (b32 + scale * delta).astype(b.dtype)

  if non_matrix not in NON_MATRIX:
    raise ValueError(f"non_matrix must be one of {NON_MATRIX}, got {non_matrix!r}.")
  return jax.tree.map_with_path(leaf, base, *experts)


def tsv_rank(rank: int, num_tasks: int) -> int:
  """Singular triplets kept per task by TSV: ⌊r · (1/T)⌋, computed as the reference does."""
  return int(rank * (1.0 / num_tasks))


def tsv_matrix(deltas: jax.Array) -> jax.Array:
  """TSV-M on one layer: [T, m, n] task matrices -> the merged [m, n] update (α = 1).

  Keeps each task's top k = ⌊r/T⌋ singular triplets, concatenates them over tasks, replaces the
  concatenated U and V by their nearest orthogonal matrices and returns U⊥ Σ V⊥ᵀ. With k = 0
  (r < T) the update is zero, as in the reference.
  """
  num_tasks, m, n = deltas.shape
  k = tsv_rank(min(m, n), num_tasks)
  if k == 0:
    return jnp.zeros((m, n), deltas.dtype)
  u, s, vt = _svd(deltas)
  u_cat = jnp.moveaxis(u[:, :, :k], 0, 1).reshape(m, num_tasks * k)  # Task-major columns.
  s_cat = s[:, :k].reshape(num_tasks * k)
  vt_cat = vt[:, :k, :].reshape(num_tasks * k, n)
  return (_polar(u_cat) * s_cat) @ _polar(vt_cat)


def tsv_merging(
  base: Params,
  experts: Sequence[Params],
  *,
  scale: Any = 1.0,
  matrices: str = "2d",
  non_matrix: str = "mean",
) -> Params:
  """TSV-M (Gargiulo et al., CVPR 2025): merge the tasks' top singular vectors, decorrelated.

  Per matrix leaf: Δ = U⊥ Σ V⊥ᵀ from each task's top ⌊r/T⌋ singular triplets (`tsv_matrix`);
  θ = θ0 + α Δ. When the tasks' kept subspaces are mutually orthogonal, this is task arithmetic
  on their rank-⌊r/T⌋ truncations.

  Args:
    base: pre-trained parameters θ0.
    experts: fine-tuned models θt.
    scale: α (paper and reference: 1.0).
    matrices: which leaves are matrices (module docstring).
    non_matrix: "mean" (reference) or "sum" of the task vectors on the other leaves.

  Returns:
    Merged parameters.
  """
  return _per_leaf(base, experts, matrices, non_matrix, lambda _, d: tsv_matrix(d), scale)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TsvCompressed(TaskSpecificMerge):
  """TSV-C's output: each task's task vector, its matrices truncated to rank k.

  Attributes:
    parts: a tree with `base`'s structure above the leaves; at each leaf either (u [T, m, k],
      s [T, k], vt [T, k, n]) for a matrix or (τ stacked [T, ...],) for a non-matrix.
    scale: α; task t's model is θ0 + α · (Ut diag(st) Vtᵀ on matrices, τt elsewhere).
  """

  parts: Any
  scale: jax.Array

  @property
  def num_tasks(self) -> int:
    first = jax.tree.leaves(self.parts)[0]
    return first.shape[0]

  def task_model(self, base: Params, task: int) -> Params:
    # One jitted program per leaf, eager or traced into the streaming engine's (same bits).
    return jax.tree.map(lambda b, part: _tsv_task_leaf(b, part, task, self.scale), base, self.parts)


@functools.partial(jax.jit, static_argnums=2)
def _tsv_task_leaf(b: jax.Array, part: tuple, task: int, scale: jax.Array) -> jax.Array:
  if len(part) == 3:
    u, s, vt = part
    delta = ((u[task] * s[task]) @ vt[task]).reshape(b.shape)
  else:
    delta = part[0][task]
  return (to_compute(b) + scale * delta).astype(b.dtype)


def tsv_compress(
  base: Params,
  experts: Sequence[Params],
  *,
  fraction: float | None = None,
  scale: Any = 1.0,
  matrices: str = "2d",
) -> TsvCompressed:
  """TSV-C (Gargiulo et al., CVPR 2025): per task, keep the top singular triplets of each matrix.

  The truncation of TSV-M without the merge: task t's model is θ0 + α · Δt,k, where Δt,k is Δt's
  best rank-k approximation, k = ⌊r · fraction⌋; non-matrix leaves keep τt whole. The stored
  factors of T tasks take about the space of one model when fraction = 1/T.

  Args:
    base: pre-trained parameters θ0.
    experts: fine-tuned models θt.
    fraction: kept fraction of each matrix's rank (static); None for 1/T (the paper's choice).
    scale: α.
    matrices: which leaves are matrices (module docstring).

  Returns:
    A `TsvCompressed`; task t's model is `result.task_model(base, t)`.
  """
  frac = 1.0 / len(experts) if fraction is None else fraction

  def leaf(b, *xs):
    b32 = to_compute(b)
    stacked = jnp.stack([to_compute(x) - b32 for x in xs])
    shape2 = matrix_shape(b.shape, matrices)
    if shape2 is None:
      return (stacked,)
    u, s, vt = _svd(stacked.reshape(len(xs), *shape2))
    k = int(min(shape2) * frac)
    return u[:, :, :k], s[:, :k], vt[:, :k, :]

  parts = jax.tree.map(leaf, base, *experts)
  return TsvCompressed(parts=parts, scale=jnp.asarray(scale, jnp.float32))


def iso_c_matrix(deltas: jax.Array) -> jax.Array:
  """ISO-C on one layer: Σt Δt = U Σ Vᵀ -> σ̄ U Vᵀ (σ̄ the mean singular value)."""
  u, s, vt = _svd(jnp.sum(deltas, axis=0))
  return jnp.mean(s) * (u @ vt)


def iso_c(
  base: Params,
  experts: Sequence[Params],
  *,
  scale: Any = 1.0,
  matrices: str = "2d",
  non_matrix: str = "mean",
) -> Params:
  """ISO-C (Marczak et al., ICML 2025): task arithmetic with a flattened (isotropic) spectrum.

  Per matrix leaf: Δ = σ̄ U Vᵀ from Σt Δt = U Σ Vᵀ (`iso_c_matrix`); θ = θ0 + α Δ.

  Args:
    base: pre-trained parameters θ0.
    experts: fine-tuned models θt.
    scale: α; the paper chooses it on validation, 1.0 is FusionBench's default.
    matrices: which leaves are matrices (module docstring).
    non_matrix: "mean" (reference) or "sum" of the task vectors on the other leaves.

  Returns:
    Merged parameters.
  """
  return _per_leaf(base, experts, matrices, non_matrix, lambda _, d: iso_c_matrix(d), scale)


def iso_cts_sizes(rank: int, num_tasks: int, common_fraction: float) -> tuple[int, int]:
  """(common directions c, directions per task) of ISO-CTS, as the reference rounds them.

  c starts at ⌊r · fraction⌋ and is adjusted so that the rest, r − c, splits evenly over tasks.
  """
  common = int(rank * common_fraction)
  common = rank - round((rank - common) / num_tasks) * num_tasks
  return common, (rank - common) // num_tasks


def iso_cts_matrix(
  deltas: jax.Array, common_fraction: float, layout: str = "torch", path: str = "?"
) -> jax.Array:
  """ISO-CTS on one layer: [T, m, n] task matrices -> the merged [m, n] update (α = 1).

  The top c directions of Σt Δt are the common subspace; each task adds its top directions after
  the common subspace is projected out of its output side; the union is orthogonalized and its
  spectrum flattened to the mean singular value.

  Args:
    deltas: the stacked task matrices.
    common_fraction: the common subspace's share of the rank (paper: 0.8).
    layout: "torch" (torch: rows are outputs) or "flax" (flax: columns are outputs).
    path: the leaf's path (error messages).
  """
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
  if layout == "flax":
    return iso_cts_matrix(jnp.swapaxes(deltas, 1, 2), common_fraction, "torch", path).T
  num_tasks, m, n = deltas.shape
  rank = min(m, n)
  common, per_task = iso_cts_sizes(rank, num_tasks, common_fraction)
  if common < 0:
    raise ValueError(
      f"iso_cts: leaf {path!r} ({m}x{n}) gets {common} common directions with "
      f"common_fraction={common_fraction:g} and {num_tasks} tasks; raise common_fraction or "
      "exclude the leaf."
    )
  u, s, vt = _svd(jnp.sum(deltas, axis=0))
  u_c, s_c, vt_c = u[:, :common], s[:common], vt[:common]
  # Remove the common subspace from each task's output side, then take its top directions.
  projected = deltas - u_c @ (u_c.T @ deltas)
  u_t, s_t, vt_t = _svd(projected)
  u_all = jnp.concatenate([jnp.moveaxis(u_t[:, :, :per_task], 0, 1).reshape(m, -1), u_c], axis=1)
  vt_all = jnp.concatenate([vt_t[:, :per_task, :].reshape(-1, n), vt_c], axis=0)
  s_mean = (jnp.sum(s_t[:, :per_task]) + jnp.sum(s_c)) / rank
  return s_mean * (_polar(u_all) @ _polar(vt_all))


def iso_cts(
  base: Params,
  experts: Sequence[Params],
  *,
  scale: Any = 1.0,
  common_fraction: float = 0.8,
  layout: str = "flax",
  matrices: str = "2d",
  non_matrix: str = "mean",
) -> Params:
  """ISO-CTS (Marczak et al., ICML 2025): isotropic merging in common and task subspaces.

  Per matrix leaf: `iso_cts_matrix`; θ = θ0 + α Δ.

  Args:
    base: pre-trained parameters θ0.
    experts: fine-tuned models θt.
    scale: α; the paper chooses it on validation, 1.0 is FusionBench's default.
    common_fraction: share of the rank given to the common subspace (static; paper: 0.8).
    layout: "flax" (flax kernels, default) or "torch" (torch weights); see the module
      docstring.
    matrices: which leaves are matrices (module docstring).
    non_matrix: "mean" (reference) or "sum" of the task vectors on the other leaves.

  Returns:
    Merged parameters.
  """

  def on_matrix(path, d):
    return iso_cts_matrix(d, common_fraction, layout, path)

  return _per_leaf(base, experts, matrices, non_matrix, on_matrix, scale)


_MATRICES = spec.choice(*MATRICES)
_NON_MATRIX = spec.choice(*NON_MATRIX)
spec.register(
  "tsv_m",
  tsv_merging,
  lapack=True,
  scale=spec.SCALE,
  matrices=_MATRICES,
  non_matrix=_NON_MATRIX,
)
spec.register(
  "tsv_c",
  tsv_compress,
  lapack=True,
  fraction=spec.HParam("float", 0.0, 1.0, "(]", static=True, optional=True),
  scale=spec.SCALE,
  matrices=_MATRICES,
)
spec.register(
  "iso_c", iso_c, lapack=True, scale=spec.SCALE, matrices=_MATRICES, non_matrix=_NON_MATRIX
)
spec.register(
  "iso_cts",
  iso_cts,
  lapack=True,
  scale=spec.SCALE,
  common_fraction=spec.HParam("float", 0.0, 1.0, "(]", static=True),
  layout=spec.choice(*LAYOUTS),
  matrices=_MATRICES,
  non_matrix=_NON_MATRIX,
)
