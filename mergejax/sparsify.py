"""Sparsifiers: `list of task vectors -> list of task vectors` functions that zero (and maybe
rescale) entries. They compose with any combiner in `mergejax.combine` (DARE→TIES, ...);
`SPARSIFIERS` names them for `rules.sparsify_combine`.

Hyper-parameters that only change values (density, gamma, epsilon) may be traced: a sweep over
them reuses one compilation. Randomness comes from one key per (expert, leaf path), so a mask never
depends on leaf order, on which other leaves exist, or on the device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mergejax import selection
from mergejax.leaf_random import (  # noqa: F401 (re-exported: the sparsifiers' randomness)
  _map_with_uniforms,
  leaf_key,
  leaf_key_data,
  uniform_from_key_data,
)
from mergejax.row_sparsify import (  # noqa: F401 (re-exported: the per-row sparsifiers)
  BREADCRUMBS_COUNTINGS,
  LAYOUTS,
  ROW_SCOPES,
  _row_axis,
  breadcrumbs,
  breadcrumbs_leaf_masks,
  della_drop,
  della_leaf_spreads,
  della_spreads,
)
from mergejax.tree import Params, to_compute

TRIM_SCOPES = ("model", "leaf")
RESCALES = ("inverse", "l1", "none")
# Counting rules of a trim (see `selection.count_for_fraction`): "round" (mergejax), "mergekit"
# (mergekit's `magnitude`: max(1, int(d·n))).
TRIM_COUNTINGS = ("round", "mergekit")


def trim_top_fraction(
  vectors: Sequence[Params],
  density: jax.Array | float,
  *,
  scope: str = "model",
  method: str = "auto",
  counting: str = "round",
) -> list[Params]:
  """TIES trim: keeps the largest-|τ| `density` fraction of each task vector, zeroes the rest.

  Entries tied with the k-th largest magnitude are kept (the TIES paper's convention), so exactly
  k entries survive unless there are ties at the threshold.

  Args:
    vectors: task vectors.
    density: fraction kept, in (0, 1]; may be traced.
    scope: "model": one threshold over all leaves of a task vector together (paper);
      "leaf": one threshold per leaf (mergekit).
    method: selection backend, see `selection.top_k_stats`.
    counting: k per group: "round": clip(round(density · n), 1, n); "mergekit":
      max(1, int(density · n)) (see `selection.count_for_fraction`).

  Returns:
    The trimmed task vectors.
  """
  leaves = [jax.tree.leaves(v) for v in vectors]
  trimmed, _ = _trim(leaves, None, density, scope, method, counting=counting)
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
  counting: str = "round",
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
    counting: "round" or "mergekit" (see `trim_top_fraction`).

  Returns:
    (trimmed float32 task vectors, `TopKStats` with one entry per expert — or per expert and
    leaf for scope "leaf").
  """
  base_leaves = jax.tree.leaves(base)
  leaves = [jax.tree.leaves(e) for e in experts]
  trimmed, stats = _trim(leaves, base_leaves, density, scope, method, stats, counting)
  treedef = jax.tree.structure(base)
  return [jax.tree.unflatten(treedef, t) for t in trimmed], stats


def _groups(leaves, base_leaves, density, scope, counting="round"):
  """The selection problems of a trim: one group per expert (or per expert and leaf)."""
  if scope not in TRIM_SCOPES:
    raise ValueError(f"scope must be one of {TRIM_SCOPES}, got {scope!r}.")
  if counting not in TRIM_COUNTINGS:
    raise ValueError(f"counting must be one of {TRIM_COUNTINGS}, got {counting!r}.")
  rounding = "floor_min1" if counting == "mergekit" else "round"
  if scope == "model":
    groups = leaves
    origins = None if base_leaves is None else [base_leaves] * len(leaves)
  else:
    groups = [[x] for g in leaves for x in g]
    origins = None if base_leaves is None else [[b] for _ in leaves for b in base_leaves]
  ks = [selection.count_for_fraction(sum(x.size for x in g), density, rounding) for g in groups]
  return groups, origins, ks


def trim_stats_eager(
  base: Params,
  experts: Sequence[Params],
  density: float,
  *,
  scope: str = "model",
  counting: str = "round",
) -> selection.TopKStats:
  """The statistics `trim_experts` needs, from concrete CPU arrays, outside jit (fast path).

  Args:
    base: pre-trained parameters θ0 (concrete arrays).
    experts: fine-tuned models θt (concrete arrays).
    density: fraction kept.
    scope: "model" or "leaf".
    counting: "round" or "mergekit" (see `trim_top_fraction`).

  Returns:
    The `TopKStats` to pass as `trim_experts(..., stats=...)`.
  """
  leaves = [jax.tree.leaves(e) for e in experts]
  groups, origins, ks = _groups(leaves, jax.tree.leaves(base), density, scope, counting)
  return selection.top_k_stats_eager(groups, [int(k) for k in ks], origins=origins)


def _trim(leaves, base_leaves, density, scope, method, stats=None, counting="round"):
  """Shared body: thresholds from `selection.top_k_stats`, then a lazy `where` per leaf."""
  groups, origins, ks = _groups(leaves, base_leaves, density, scope, counting)
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
