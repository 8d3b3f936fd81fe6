"""Sparsifiers: `list of task vectors -> list of task vectors` functions that zero (and maybe
rescale) entries. They compose with any combiner in `mergejax.combine` (DARE→TIES, ...);
`SPARSIFIERS` names them for `rules.sparsify_combine`.

Hyper-parameters that only change values (density, gamma, epsilon) may be traced: a sweep over
them reuses one compilation. Randomness comes from one key per (expert, leaf path), so a mask never
depends on leaf order, on which other leaves exist, or on the device.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mergejax import leafwise, selection
from mergejax.tree import Params, path_str, to_compute

TRIM_SCOPES = ("model", "leaf")
ROW_SCOPES = ("leaf", "row")
RESCALES = ("inverse", "l1", "none")


def trim_top_fraction(
  vectors: Sequence[Params],
  density: jax.Array | float,
  *,
  scope: str = "model",
  method: str = "auto",
) -> list[Params]:
  """TIES trim: keeps the largest-|τ| `density` fraction of each task vector, zeroes the rest.

  Entries tied with the k-th largest magnitude are kept (the TIES paper's convention), so exactly
  k entries survive unless there are ties at the threshold.

  Args:
    vectors: task vectors.
    density: fraction kept, in (0, 1]; k = clip(round(density · n), 1, n). May be traced.
    scope: "model": one threshold over all leaves of a task vector together (paper);
      "leaf": one threshold per leaf (mergekit).
    method: selection backend, see `selection.top_k_stats`.

  Returns:
    The trimmed task vectors.
  """
  leaves = [jax.tree.leaves(v) for v in vectors]
  trimmed, _ = _trim(leaves, None, density, scope, method)
  return [
    jax.tree.unflatten(jax.tree.structure(v), t) for v, t in zip(vectors, trimmed, strict=True)
  ]


def trim_experts(
  base: Params,
  experts: Sequence[Params],
  density: jax.Array | float,
  *,
  scope: str = "model",
  method: str = "auto",
  stats: selection.TopKStats | None = None,
) -> tuple[list[Params], selection.TopKStats]:
  """`trim_top_fraction` of the experts' task vectors, computed from θt and θ0 directly.

  Selecting on |θt − θ0| on the fly never materializes the task vectors (on CPU, where the
  selection runs in NumPy, that halves the time), and the returned statistics of the kept entries
  give TIES's zero-sum election fallback for free.

  Args:
    base: pre-trained parameters θ0.
    experts: fine-tuned models θt.
    density: fraction kept, in (0, 1]; may be traced.
    scope: "model" or "leaf" (see `trim_top_fraction`).
    method: selection backend, see `selection.top_k_stats`.
    stats: precomputed statistics (see `trim_stats_eager`); skips the selection.

  Returns:
    (trimmed float32 task vectors, `TopKStats` with one entry per expert — or per expert and
    leaf for scope "leaf").
  """
  base_leaves = jax.tree.leaves(base)
  leaves = [jax.tree.leaves(e) for e in experts]
  trimmed, stats = _trim(leaves, base_leaves, density, scope, method, stats)
  treedef = jax.tree.structure(base)
  return [jax.tree.unflatten(treedef, t) for t in trimmed], stats


def _groups(leaves, base_leaves, density, scope):
  """The selection problems of a trim: one group per expert (or per expert and leaf)."""
  if scope not in TRIM_SCOPES:
    raise ValueError(f"scope must be one of {TRIM_SCOPES}, got {scope!r}.")
  if scope == "model":
    groups = leaves
    origins = None if base_leaves is None else [base_leaves] * len(leaves)
  else:
    groups = [[x] for g in leaves for x in g]
    origins = None if base_leaves is None else [[b] for _ in leaves for b in base_leaves]
  ks = [selection.count_for_fraction(sum(x.size for x in g), density) for g in groups]
  return groups, origins, ks


def trim_stats_eager(
  base: Params, experts: Sequence[Params], density: float, *, scope: str = "model"
) -> selection.TopKStats:
  """The statistics `trim_experts` needs, from concrete CPU arrays, outside jit (fast path).

  Args:
    base: pre-trained parameters θ0 (concrete arrays).
    experts: fine-tuned models θt (concrete arrays).
    density: fraction kept.
    scope: "model" or "leaf".

  Returns:
    The `TopKStats` to pass as `trim_experts(..., stats=...)`.
  """
  leaves = [jax.tree.leaves(e) for e in experts]
  groups, origins, ks = _groups(leaves, jax.tree.leaves(base), density, scope)
  return selection.top_k_stats_eager(groups, [int(k) for k in ks], origins=origins)


def _trim(leaves, base_leaves, density, scope, method, stats=None):
  """Shared body: thresholds from `selection.top_k_stats`, then a lazy `where` per leaf."""
  groups, origins, ks = _groups(leaves, base_leaves, density, scope)
  if stats is None:
    stats = selection.top_k_stats(groups, jnp.stack(ks), origins=origins, method=method)

  trimmed = []
  for t, expert_leaves in enumerate(leaves):
    out = []
    for i, x in enumerate(expert_leaves):
      d = to_compute(x) if base_leaves is None else to_compute(x) - to_compute(base_leaves[i])
      th = stats.threshold[t] if scope == "model" else stats.threshold[t * len(expert_leaves) + i]
      out.append(jnp.where(jnp.abs(d) >= th, d, 0.0))
    trimmed.append(out)
  return trimmed, stats


def leaf_key(key: jax.Array, expert_index: int, path: str) -> jax.Array:
  """Returns the PRNG key for one leaf of one expert: fold_in(fold_in(key, expert), crc32(path)).

  crc32 (not Python's salted `hash`) keeps keys identical across processes and machines.

  Args:
    key: the run's key.
    expert_index: position of the expert in the list.
    path: the leaf's "a/b/c" path.

  Returns:
    A key that depends only on (key, expert_index, path).
  """
  return jax.random.fold_in(jax.random.fold_in(key, expert_index), _path_hash(path))


def _path_hash(path: str) -> int:
  return zlib.crc32(path.encode()) & 0x7FFFFFFF


def leaf_key_data(key: jax.Array, num_experts: int, paths: Sequence[str]) -> jax.Array:
  """Raw data of `leaf_key(key, t, path)` for every expert t and path, in one vectorized call.

  One batched fold_in instead of one per leaf and expert: each threefry call site costs XLA ~0.1 s
  of compile time on CPU, which for 8 experts x 150 leaves came to minutes.

  Args:
    key: the run's key (any PRNG implementation).
    num_experts: T.
    paths: the L leaf paths.

  Returns:
    uint32 array [T, L, W] (W = key words of the PRNG implementation).
  """
  experts = jnp.repeat(jnp.arange(num_experts, dtype=jnp.uint32), len(paths))
  hashes = jnp.tile(jnp.asarray([_path_hash(p) for p in paths], jnp.uint32), num_experts)
  keys = jax.vmap(lambda t, h: jax.random.fold_in(jax.random.fold_in(key, t), h))(experts, hashes)
  data = jax.random.key_data(keys)
  return data.reshape(num_experts, len(paths), data.shape[-1])


def _fmix32(x: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finalizer: a bijection on uint32 with full avalanche."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def uniform_from_key_data(key_data: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Counter-based uniforms in [0, 1): u_i = hash(i, key words), 24-bit resolution.

  Each entry is a pure function of its index and the leaf's jax.random key, so masks are
  independent of leaf order, device and sharding, fuse into the merge's elementwise pass (no
  random-bit buffer), and compile in milliseconds. Threefry bits per leaf measured ~15x slower on
  CPU, held a bit buffer per leaf and expert, and took minutes to compile for a ViT.

  Args:
    key_data: uint32 [W] words of a leaf key (from `leaf_key_data`).
    shape: the leaf's shape.

  Returns:
    float32 array of `shape`.
  """
  size = int(np.prod(shape)) if shape else 1
  x = lax.iota(jnp.uint32, size).reshape(shape) * jnp.uint32(0x9E3779B9)
  for w in range(key_data.shape[-1]):
    x = _fmix32(x ^ key_data[w])
  return (x >> 8).astype(jnp.float32) * (1.0 / (1 << 24))


def _map_with_uniforms(vectors: Sequence[Params], key: jax.Array, fn) -> list[Params]:
  """Returns, per vector, the tree of `fn(leaf, uniforms shaped like leaf)`, one key per
  (expert, leaf path)."""
  if isinstance(key, leafwise.FoldedKeys):  # The streaming engine's per-leaf calls.
    data = key.data
  else:
    paths = [path_str(p) for p, _ in jax.tree.flatten_with_path(vectors[0])[0]]
    data = leaf_key_data(key, len(vectors), paths)
  out = []
  for t, vector in enumerate(vectors):
    leaves, treedef = jax.tree.flatten(vector)
    new = [fn(x, uniform_from_key_data(data[t, i], x.shape)) for i, x in enumerate(leaves)]
    out.append(jax.tree.unflatten(treedef, new))
  return out


def random_drop(
  vectors: Sequence[Params],
  key: jax.Array,
  density: jax.Array | float,
  *,
  rescale: str = "inverse",
) -> list[Params]:
  """DARE: drops each entry with probability p = 1 − density, then rescales survivors.

  Args:
    vectors: task vectors.
    key: PRNG key; leaf keys come from `leaf_key`, entries from `uniform_from_key_data`.
    density: keep probability 1 − p, in (0, 1]; may be traced.
    rescale: "inverse": survivors × 1/(1−p) (paper, unbiased); "l1": per leaf, match the L1 norm
      of the original leaf (mergekit); "none".

  Returns:
    The sparsified task vectors.
  """
  if rescale not in RESCALES:
    raise ValueError(f"rescale must be one of {RESCALES}, got {rescale!r}.")
  density = jnp.asarray(density, jnp.float32)

  def drop(x, uniform):
    kept = jnp.where(uniform < density, x, 0.0)
    if rescale == "inverse":
      return kept / density
    if rescale == "l1":
      norm_in, norm_out = jnp.sum(jnp.abs(x)), jnp.sum(jnp.abs(kept))
      return kept * jnp.where(norm_out > 0, norm_in / jnp.where(norm_out > 0, norm_out, 1.0), 0.0)
    return kept

  return _map_with_uniforms(vectors, key, drop)


def _as_rows(x: jax.Array, scope: str) -> jax.Array:
  """Views a leaf as rows: [1, n] for scope "leaf", [-1, last_dim] for scope "row"."""
  if scope == "leaf" or x.ndim < 2:
    return x.reshape(1, -1)
  return x.reshape(-1, x.shape[-1])


def breadcrumbs(
  vectors: Sequence[Params],
  density: jax.Array | float,
  gamma: jax.Array | float,
  *,
  scope: str = "leaf",
) -> list[Params]:
  """Model Breadcrumbs mask: drops the top-`gamma` outliers by |τ| and everything below the
  next `density` fraction, per leaf (or per row along the last axis).

  Unlike mergekit, a leaf with gamma · n < 1 drops no outlier instead of being zeroed whole.

  Args:
    vectors: task vectors.
    density: fraction kept (after the outliers), in (0, 1]; may be traced.
    gamma: fraction of largest entries dropped as outliers, in [0, 1); may be traced.
    scope: "leaf" or "row" (rows along the last axis, as the reference code for 2-D weights).

  Returns:
    The masked task vectors (no rescaling; Breadcrumbs scales the sum by α afterwards).
  """
  if scope not in ROW_SCOPES:
    raise ValueError(f"scope must be one of {ROW_SCOPES}, got {scope!r}.")

  def mask_leaf(x):
    rows = _as_rows(x, scope)
    m = rows.shape[-1]
    n_top = jnp.floor(jnp.asarray(gamma, jnp.float32) * m).astype(jnp.int32)
    n_keep = selection.count_for_fraction(m, density)
    upper = selection.kth_largest_magnitude_per_row(rows, jnp.maximum(n_top, 1))
    lower = selection.kth_largest_magnitude_per_row(rows, jnp.minimum(n_top + n_keep, m))
    magnitude = jnp.abs(rows)
    keep = (magnitude >= lower[:, None]) & ((n_top == 0) | (magnitude < upper[:, None]))
    return jnp.where(keep, rows, 0.0).reshape(x.shape)

  return [jax.tree.map(mask_leaf, v) for v in vectors]


def della_drop(
  vectors: Sequence[Params],
  key: jax.Array,
  density: jax.Array | float,
  epsilon: jax.Array | float,
  *,
  scope: str = "row",
) -> list[Params]:
  """DELLA MagPrune: drop with a keep probability that grows with magnitude rank, rescale by 1/p.

  Within a row (or leaf), the entry of rank r (0 = smallest |τ|, m − 1 = largest) is kept with
  probability p_r = density − ε + 2ε · r / (m − 1), and survivors are divided by p_r.

  Args:
    vectors: task vectors.
    key: PRNG key; leaf keys come from `leaf_key`.
    density: mean keep probability, in (0, 1]; may be traced.
    epsilon: half-width of the probability range; density ± ε must stay in (0, 1].
    scope: "row" (rows along the last axis, paper) or "leaf".

  Returns:
    The sparsified, rescaled task vectors.
  """
  if scope not in ROW_SCOPES:
    raise ValueError(f"scope must be one of {ROW_SCOPES}, got {scope!r}.")

  def drop(x, uniform):
    rows = _as_rows(x, scope)
    m = rows.shape[-1]
    rank = jnp.argsort(jnp.argsort(jnp.abs(rows), axis=-1), axis=-1).astype(jnp.float32)
    spread = rank / max(m - 1, 1) * 2.0 - 1.0 if m > 1 else jnp.zeros_like(rank)
    p = jnp.clip(density + epsilon * spread, 1e-6, 1.0)
    keep = uniform.reshape(rows.shape) < p
    return jnp.where(keep, rows / p, 0.0).reshape(x.shape)

  return _map_with_uniforms(vectors, key, drop)


class Sparsifier(NamedTuple):
  """A registered sparsifier: `fn(vectors, [key,] **hparams) -> vectors`.

  Attributes:
    fn: the sparsifier, called with keyword arguments.
    hparams: the hyper-parameters it reads ("density", "gamma", "epsilon").
    random: whether it takes a `key`.
  """

  fn: Callable[..., list[Params]]
  hparams: tuple[str, ...]
  random: bool


def keep_all(vectors: Sequence[Params]) -> list[Params]:
  """The identity sparsifier (plain task arithmetic / averaging downstream)."""
  return list(vectors)


SPARSIFIERS = {
  "none": Sparsifier(keep_all, (), False),
  "ties_trim": Sparsifier(trim_top_fraction, ("density",), False),
  "dare": Sparsifier(random_drop, ("density",), True),
  "breadcrumbs": Sparsifier(breadcrumbs, ("density", "gamma"), False),
  "della": Sparsifier(della_drop, ("density", "epsilon"), True),
}


def apply_sparsifier(
  name: str, vectors: Sequence[Params], *, key: jax.Array | None = None, **hparams
) -> list[Params]:
  """Runs the sparsifier registered as `name` with its defaults for everything not given.

  Args:
    name: key of `SPARSIFIERS`.
    vectors: task vectors.
    key: PRNG key (required by the random sparsifiers).
    **hparams: the sparsifier's hyper-parameters (see `Sparsifier.hparams`).

  Returns:
    The sparsified task vectors.
  """
  if name not in SPARSIFIERS:
    raise ValueError(f"sparsifier must be one of {sorted(SPARSIFIERS)}, got {name!r}.")
  s = SPARSIFIERS[name]
  unknown = sorted(set(hparams) - set(s.hparams))
  if unknown:
    raise TypeError(f"Sparsifier {name!r} takes {list(s.hparams)}, not {unknown}.")
  if s.random:
    if key is None:
      raise ValueError(f"sparsifier={name!r} is random: pass key=jax.random.key(seed).")
    return s.fn(vectors, key=key, **hparams)
  return s.fn(vectors, **hparams)
