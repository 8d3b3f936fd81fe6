"""Per-leaf randomness of the random sparsifiers (DARE, DELLA): one key per (expert, leaf path)
and counter-based uniforms, so a mask never depends on leaf order, other leaves or the device.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mergejax import leafwise
from mergejax.tree import Params, path_str


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
    uint32 array [T, L, W] (W = key words of the PRNG implementation); NumPy for a concrete
    threefry key.
  """
  experts = np.repeat(np.arange(num_experts, dtype=np.uint32), len(paths))
  hashes = np.tile(np.asarray([_path_hash(p) for p in paths], np.uint32), num_experts)
  if _is_concrete_threefry(key):  # NumPy: the jitted folds cost 0.15-0.3 s of compile per run.
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    words = np.asarray(jax.random.key_data(key) if typed else key, np.uint32)
    data = _threefry_fold_in(_threefry_fold_in(words, experts), hashes)
  else:
    data = _folded_key_data(key, experts, hashes)
  return data.reshape(num_experts, len(paths), data.shape[-1])


def _is_concrete_threefry(key) -> bool:
  if isinstance(key, jax.core.Tracer):
    return False
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return str(jax.random.key_impl(key)) == "threefry2x32" and key.shape == ()
  # Raw key data (jax.random.PRNGKey): the default implementation's.
  default = getattr(jax.config, "jax_default_prng_impl", None)
  return default == "threefry2x32" and np.shape(key) == (2,)


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry_fold_in(words: np.ndarray, data: np.ndarray) -> np.ndarray:
  """`jax.random.fold_in` of threefry2x32 keys (`words`: [2] or [N, 2] uint32) with uint32
  `data` [N], in NumPy: Threefry-2x32 (20 rounds) of the counter (0, data) under the key, as
  `jax._src.prng.threefry_2x32` computes it (tested against it)."""
  words = np.broadcast_to(words, (data.size, 2)).astype(np.uint32)
  k0, k1 = words[:, 0], words[:, 1]
  ks = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
  with np.errstate(over="ignore"):
    x0, x1 = np.zeros_like(data, np.uint32) + ks[0], data.astype(np.uint32) + ks[1]
    for step in range(5):
      for r in _ROTATIONS[step % 2]:
        x0 = x0 + x1
        x1 = (x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))
        x1 = x0 ^ x1
      x0 = x0 + ks[(step + 1) % 3]
      x1 = x1 + ks[(step + 2) % 3] + np.uint32(step + 1)
  return np.stack([x0, x1], axis=-1)


@jax.jit
def _folded_key_data(key: jax.Array, experts: jax.Array, hashes: jax.Array) -> jax.Array:
  # One compiled program: run op by op, the folds dispatched (and compiled) each primitive alone,
  # 1.27 s against 0.44-0.79 s jitted for 8 experts x 150 leaves, cold, on a busy 2-core machine.
  keys = jax.vmap(lambda t, h: jax.random.fold_in(jax.random.fold_in(key, t), h))(experts, hashes)
  return jax.random.key_data(keys)


def _fmix32(x: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finalizer: a bijection on uint32 with full avalanche."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def uniform_from_key_data(
  key_data: jax.Array, shape: tuple[int, ...], offset: jax.Array | None = None
) -> jax.Array:
  """Counter-based uniforms in [0, 1): u_i = hash(i, key words), 24-bit resolution.

  Each entry is a pure function of its index and the leaf's jax.random key, so masks are
  independent of leaf order, device and sharding, fuse into the merge's elementwise pass (no
  random-bit buffer), and compile in milliseconds. Threefry bits per leaf measured ~15x slower on
  CPU, held a bit buffer per leaf and expert, and took minutes to compile for a ViT.

  Args:
    key_data: uint32 [W] words of a leaf key (from `leaf_key_data`).
    shape: the leaf's shape.
    offset: None, or the flat index of entry 0 (a chunk of a flattened leaf: its uniforms are
      the leaf's at those indices).

  Returns:
    float32 array of `shape`.
  """
  size = int(np.prod(shape)) if shape else 1
  index = lax.iota(jnp.uint32, size)
  if offset is not None:
    index = index + jnp.asarray(offset, jnp.uint32)
  x = index.reshape(shape) * jnp.uint32(0x9E3779B9)
  for w in range(key_data.shape[-1]):
    x = _fmix32(x ^ key_data[w])
  return (x >> 8).astype(jnp.float32) * (1.0 / (1 << 24))


def _map_with_uniforms(
  vectors: Sequence[Params], key: jax.Array, fn, extras: Sequence[Params] | None = None
) -> list[Params]:
  """Returns, per vector, the tree of `fn(leaf, uniforms shaped like leaf)` (with `extras`, one
  tree per vector: `fn(leaf, uniforms, that tree's leaf)`), one key per (expert, leaf path)."""
  offset = None
  if isinstance(key, leafwise.FoldedKeys):  # The streaming engine's per-leaf calls.
    data, offset = key.data, key.offset
  else:
    paths = [path_str(p) for p, _ in jax.tree.flatten_with_path(vectors[0])[0]]
    data = leaf_key_data(key, len(vectors), paths)
  out = []
  for t, vector in enumerate(vectors):
    leaves, treedef = jax.tree.flatten(vector)
    more = [[]] * len(leaves) if extras is None else [[e] for e in treedef.flatten_up_to(extras[t])]
    new = [
      fn(x, uniform_from_key_data(data[t, i], x.shape, offset), *more[i])
      for i, x in enumerate(leaves)
    ]
    out.append(jax.tree.unflatten(treedef, new))
  return out
