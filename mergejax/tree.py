"""Pytree helpers: "a/b/c" leaf paths, path-pattern selection, validation, dtype policy.

Everything above this module (task vectors, sparsifiers, rules, checkpoints) names leaves by their
"a/b/c" path, so masks, keys and error messages do not depend on leaf order.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Params = Any  # A nested dict of arrays.

# Arithmetic happens in float32 whatever the storage dtype (bf16/fp16 storage loses too much in sums
# of many task vectors); results are cast back to the storage dtype of the pre-trained model.
COMPUTE_DTYPE = jnp.float32


def path_str(key_path: Sequence[Any]) -> str:
  """Returns the "a/b/c" name of a jax key path.

  Args:
    key_path: a key path as given by `jax.tree.map_with_path` / `jax.tree.flatten_with_path`.

  Returns:
    The path's keys joined by "/" (dict keys, sequence indices, attribute names).
  """
  parts = []
  for entry in key_path:
    if isinstance(entry, jax.tree_util.DictKey):
      parts.append(str(entry.key))
    elif isinstance(entry, jax.tree_util.SequenceKey):
      parts.append(str(entry.idx))
    elif isinstance(entry, jax.tree_util.GetAttrKey):
      parts.append(entry.name)
    elif isinstance(entry, jax.tree_util.FlattenedIndexKey):
      parts.append(str(entry.key))
    else:
      parts.append(str(entry))
  return "/".join(parts)


def leaf_paths(params: Params) -> list[str]:
  """Returns the "a/b/c" path of every leaf, in `jax.tree.leaves` order."""
  return [path_str(p) for p, _ in jax.tree.flatten_with_path(params)[0]]


def flatten(params: Params) -> dict[str, Any]:
  """Flattens a pytree into `{"a/b/c": leaf}`.

  Args:
    params: any pytree.

  Returns:
    A dict from leaf path to leaf, in `jax.tree.leaves` order.
  """
  return {path_str(p): leaf for p, leaf in jax.tree.flatten_with_path(params)[0]}


def unflatten(flat: dict[str, Any], sep: str = "/") -> dict:
  """Inverse of `flatten` for nested dicts.

  Args:
    flat: `{"a/b/c": leaf}`.
    sep: the separator used in the keys.

  Returns:
    The nested dict `{"a": {"b": {"c": leaf}}}`.

  Raises:
    ValueError: if one path is a prefix of another ("a/b" and "a/b/c").
  """
  nested: dict = {}
  for name, leaf in flat.items():
    keys = name.split(sep)
    node = nested
    for i, key in enumerate(keys[:-1]):
      child = node.setdefault(key, {})
      if not isinstance(child, dict):
        raise ValueError(f"Path {name!r} passes through leaf {sep.join(keys[: i + 1])!r}.")
      node = child
    if keys[-1] in node:
      raise ValueError(f"Path {name!r} is both a leaf and a subtree (or appears twice).")
    node[keys[-1]] = leaf
  return nested


def _compile(patterns: str | Iterable[str] | None) -> list[re.Pattern] | None:
  if patterns is None:
    return None
  if isinstance(patterns, str):
    patterns = [patterns]
  return [re.compile(p) for p in patterns]


def path_predicate(
  include: str | Iterable[str] | None = None, exclude: str | Iterable[str] | None = None
) -> Callable[[str], bool]:
  """Returns `f(path) -> bool`: the path fully matches an `include` regex and no `exclude` regex.

  Args:
    include: regex or regexes matched against the whole "a/b/c" path (`re.fullmatch`); None keeps
      every leaf.
    exclude: regex or regexes; a leaf matching any is left out.

  Returns:
    The predicate.
  """
  inc, exc = _compile(include), _compile(exclude)

  def predicate(path: str) -> bool:
    if inc is not None and not any(p.fullmatch(path) for p in inc):
      return False
    return not (exc is not None and any(p.fullmatch(path) for p in exc))

  return predicate


def check_compatible(
  reference: Params,
  others: Sequence[Params],
  *,
  reference_name: str = "base",
  other_names: Sequence[str] | None = None,
  check_dtypes: bool = True,
) -> None:
  """Raises a ValueError naming the first leaf path where trees disagree.

  Checks tree structure, then shape and dtype of every leaf. Works on arrays and on tracers
  (shapes and dtypes are static), so rules call it at trace time.

  Args:
    reference: the tree every other tree must match (usually the pre-trained model).
    others: trees to check (usually the experts).
    reference_name: how to call `reference` in messages.
    other_names: how to call each of `others` (default "experts[i]").
    check_dtypes: also require equal dtypes.

  Raises:
    ValueError: on the first disagreement, naming the tree and the leaf path.
  """
  ref_flat = flatten(reference)
  names = other_names or [f"experts[{i}]" for i in range(len(others))]
  for name, other in zip(names, others, strict=True):
    flat = flatten(other)
    if flat.keys() != ref_flat.keys():
      missing = sorted(ref_flat.keys() - flat.keys())
      extra = sorted(flat.keys() - ref_flat.keys())
      raise ValueError(
        f"{name} does not have the tree structure of {reference_name}: missing leaves "
        f"{missing[:5]}, unexpected leaves {extra[:5]}. Load both from the same architecture, or "
        "select the shared leaves with include=/exclude= patterns."
      )
    if jax.tree.structure(other) != jax.tree.structure(reference):
      raise ValueError(
        f"{name} has the leaf paths of {reference_name} but another container structure "
        f"({jax.tree.structure(other)} vs {jax.tree.structure(reference)})."
      )
    for path, ref_leaf in ref_flat.items():
      leaf = flat[path]
      if np.shape(leaf) != np.shape(ref_leaf):
        raise ValueError(
          f"Leaf {path!r}: {name} has shape {np.shape(leaf)} but {reference_name} has "
          f"{np.shape(ref_leaf)}. Experts must be fine-tuned from the same architecture."
        )
      if check_dtypes and _dtype(leaf) != _dtype(ref_leaf):
        raise ValueError(
          f"Leaf {path!r}: {name} has dtype {_dtype(leaf)} but {reference_name} has "
          f"{_dtype(ref_leaf)}. Cast the experts to the pre-trained model's dtype before "
          f"merging: jax.tree.map(lambda x: x.astype(jnp.{_dtype(ref_leaf).name}), expert) "
          "(on the command line: --config.cast_experts=True)."
        )


def check_finite(params: Params, *, name: str = "params", hint: str | None = None) -> None:
  """Raises a ValueError naming the first leaf that holds NaN or Inf (host-side, not jittable).

  Args:
    params: the tree to check (concrete arrays).
    name: how to call the tree in the message.
    hint: the likely cause, for the message (default: a broken checkpoint).

  Raises:
    ValueError: naming the leaf path and the number of non-finite entries.
  """
  flat = flatten(params)
  # One device reduction per leaf, one host transfer for all of them.
  bad = jax.device_get({k: jnp.sum(~jnp.isfinite(v)) for k, v in flat.items() if is_float(v)})
  for path, count in bad.items():
    if count:
      raise ValueError(
        f"Leaf {path!r} of {name} holds {int(count)} NaN/Inf value(s); "
        f"{hint or 'the checkpoint is broken or was saved mid-divergence'}."
      )


def _dtype(x: Any) -> np.dtype:
  # `.dtype` of arrays and tracers directly: jnp.result_type costs ~10 µs a leaf, which adds up
  # to tens of milliseconds for 8 experts of 150 leaves.
  dtype = getattr(x, "dtype", None)
  return np.dtype(dtype) if dtype is not None else np.dtype(jnp.result_type(x))


def is_float(x: Any) -> bool:
  """Whether a leaf has a floating dtype (bf16, fp16, fp8 included); ints and bools do not."""
  return jnp.issubdtype(_dtype(x), jnp.floating)


def to_compute(x: jax.Array) -> jax.Array:
  """Casts a floating leaf to the compute dtype (float32); non-float leaves are left as they are."""
  return x.astype(COMPUTE_DTYPE) if is_float(x) else x


def num_params(params: Params) -> int:
  """Returns the total number of entries over all leaves."""
  return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params))


def num_bytes(params: Params) -> int:
  """Returns the total size of all leaves' data in bytes (no transfer, nothing read)."""
  return sum(int(np.prod(np.shape(x))) * _dtype(x).itemsize for x in jax.tree.leaves(params))
