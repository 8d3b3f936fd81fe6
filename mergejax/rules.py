"""Data-free merge rules: pure functions `(base, experts, **hparams) -> merged params`.

Each rule is a few lines composed from `task_vectors` (algebra), `sparsify` (trim / random drop /
Breadcrumbs / DELLA) and `combine` (sum, mean, sign election + disjoint merge). Rules are jit-able
and leave jit to the caller; `merge` is the validated, jit-cached front door.

Conventions:
* `base` is θ0; `experts` is a list of θt with the structure, shapes and dtypes of `base`.
* Arithmetic is float32; the output has the dtypes of `base`.
* `scale` (λ) and fractions (`density`, `gamma`, ...) may be traced: a sweep reuses one compile.
* Random rules take an explicit `key`; masks come from one key per (expert, leaf path).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mergejax import combine as combine_lib
from mergejax import sparsify
from mergejax import task_vectors as tv
from mergejax import tree as tree_lib
from mergejax.tree import Params, to_compute


# ----------------------------------------------------------------------------- simple averages
def weight_average(
  base: Params, experts: Sequence[Params], *, weights: Sequence[float] | None = None
) -> Params:
  """Weight averaging (model soup): θ = Σt wt θt / Σt wt.

  Args:
    base: pre-trained parameters (only their dtypes are used).
    experts: fine-tuned models.
    weights: one weight per expert (normalized to sum to one); None for the plain mean.

  Returns:
    The averaged parameters, in the dtypes of `base`.
  """
  n = len(experts)
  w = jnp.full((n,), 1.0 / n) if weights is None else jnp.asarray(weights, jnp.float32)
  if w.shape != (n,):
    raise ValueError(f"weights: expected one per expert ({n}), got shape {w.shape}.")
  w = w / jnp.sum(w)

  def average(b, *xs):
    return sum(w[i] * to_compute(x) for i, x in enumerate(xs)).astype(b.dtype)

  return jax.tree.map(average, base, *experts)


def task_arithmetic(base: Params, experts: Sequence[Params], *, scale: Any = 0.3) -> Params:
  """Task arithmetic (Ilharco et al. 2023): θ = θ0 + λ Σt (θt − θ0).

  Args:
    base: pre-trained parameters θ0.
    experts: fine-tuned models θt.
    scale: λ (choose it on validation; 0.3 is the paper's usual value).

  Returns:
    Merged parameters.

  >>> base = {"w": jnp.zeros(2)}
  >>> task_arithmetic(base, [{"w": jnp.ones(2)}, {"w": jnp.array([1.0, -1.0])}], scale=0.5)["w"]
  Array([1., 0.], dtype=float32)
  """
  return tv.apply(base, combine_lib.sum_combine(tv.task_vectors(base, experts)), scale)


def task_negation(base: Params, experts: Sequence[Params], *, scale: Any = 1.0) -> Params:
  """Task negation (forgetting): θ = θ0 − λ Σt τt.

  Args:
    base: pre-trained parameters θ0.
    experts: the models whose tasks are to be forgotten.
    scale: λ; the paper takes the largest λ keeping control accuracy ≥ 95% of θ0's.

  Returns:
    Parameters with the tasks subtracted.
  """
  return tv.apply(base, tv.negate(combine_lib.sum_combine(tv.task_vectors(base, experts))), scale)


# ----------------------------------------------------------------- sparsify, then combine
def _combine(vectors, combine: str, election: str = "mass", reduce: str = "mean"):
  if combine == "ties":
    return combine_lib.ties_combine(vectors, election=election, reduce=reduce)
  if combine not in combine_lib.COMBINERS:
    raise ValueError(f"combine must be one of {sorted(combine_lib.COMBINERS)}, got {combine!r}.")
  return combine_lib.COMBINERS[combine](vectors)


def ties_merging(
  base: Params,
  experts: Sequence[Params],
  *,
  density: Any = 0.2,
  scale: Any = 1.0,
  trim_scope: str = "model",
  election: str = "mass",
  reduce: str = "mean",
  selection_method: str = "auto",
  trim_stats: Any = None,
) -> Params:
  """TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint merge, scale.

  Paper defaults: top 20% over the whole flattened task vector, mass election, disjoint mean,
  λ = 1 without validation. FusionBench's setting is `reduce="sum", scale=0.3`; mergekit's
  is `trim_scope="leaf"`.

  Args:
    base: pre-trained parameters θ0.
    experts: fine-tuned models θt.
    density: fraction of each task vector kept by the trim, in (0, 1].
    scale: λ.
    trim_scope: "model" (one threshold over all leaves) or "leaf".
    election: "mass" or "count" (see `combine.elect_sign`).
    reduce: "mean", "sum" or "max" (see `combine.disjoint_merge`).
    selection_method: "auto", "host" or "bisect" (see `selection.top_k_stats`).
    trim_stats: precomputed `sparsify.trim_stats_eager(base, experts, density, scope=...)`;
      `merge` passes them on CPU (TIES on 22M x 8 experts: 0.45 s, against 1.1-1.2 s with
      the selection inside jit).

  Returns:
    Merged parameters.
  """
  vectors, stats = sparsify.trim_experts(
    base, experts, density, scope=trim_scope, method=selection_method, stats=trim_stats
  )
  total = jnp.sum(stats.kept_sum if election == "mass" else stats.kept_sign_sum)
  merged = combine_lib.ties_combine(vectors, election=election, reduce=reduce, total=total)
  return tv.apply(base, merged, scale)


def dare(
  base: Params,
  experts: Sequence[Params],
  *,
  key: jax.Array,
  density: Any = 0.1,
  scale: Any = 1.0,
  rescale: str = "inverse",
  combine: str = "sum",
) -> Params:
  """DARE (Yu et al. 2024): random drop with p = 1 − density, rescale, then combine.

  Args:
    base: pre-trained parameters θ0.
    experts: fine-tuned models θt.
    key: PRNG key (one key per expert and leaf path is derived from it).
    density: keep probability (paper: p = 0.9 drop, i.e. density 0.1).
    scale: λ.
    rescale: "inverse" (1/(1−p), paper), "l1" (mergekit) or "none".
    combine: "sum" (DARE + task arithmetic), "ties" (DARE-TIES) or "mean".

  Returns:
    Merged parameters.
  """
  vectors = sparsify.random_drop(tv.task_vectors(base, experts), key, density, rescale=rescale)
  return tv.apply(base, _combine(vectors, combine), scale)


def dare_ties(
  base: Params,
  experts: Sequence[Params],
  *,
  key: jax.Array,
  density: Any = 0.1,
  scale: Any = 1.0,
  rescale: str = "inverse",
  election: str = "mass",
  reduce: str = "mean",
) -> Params:
  """DARE-TIES: DARE's random drop and rescale, then TIES's sign election and disjoint merge."""
  vectors = sparsify.random_drop(tv.task_vectors(base, experts), key, density, rescale=rescale)
  return tv.apply(base, _combine(vectors, "ties", election, reduce), scale)


def breadcrumbs(
  base: Params,
  experts: Sequence[Params],
  *,
  density: Any = 0.15,
  gamma: Any = 0.006,
  scale: Any = 0.2,
  scope: str = "leaf",
  combine: str = "sum",
) -> Params:
  """Model Breadcrumbs (Davari & Belilovsky 2024): drop outliers and small entries, sum, scale.

  Defaults are the reference search's seed point (density 0.15, γ 0.006, α 0.2).

  Args:
    base: pre-trained parameters θ0.
    experts: fine-tuned models θt.
    density: fraction kept below the outliers.
    gamma: fraction of top-|τ| outliers dropped.
    scale: α.
    scope: "leaf" or "row" (the reference code's row-wise masks).
    combine: "sum" (paper) or "ties" (Breadcrumbs→TIES).

  Returns:
    Merged parameters.
  """
  vectors = sparsify.breadcrumbs(tv.task_vectors(base, experts), density, gamma, scope=scope)
  return tv.apply(base, _combine(vectors, combine), scale)


def della(
  base: Params,
  experts: Sequence[Params],
  *,
  key: jax.Array,
  density: Any = 0.3,
  epsilon: Any = 0.1,
  scale: Any = 1.0,
  scope: str = "row",
  combine: str = "ties",
) -> Params:
  """DELLA-Merging (Deep et al. 2024): MagPrune (rank-dependent drop, 1/p rescale), elect, fuse.

  Args:
    base: pre-trained parameters θ0.
    experts: fine-tuned models θt.
    key: PRNG key.
    density: mean keep probability.
    epsilon: keep probabilities range over density ± ε by magnitude rank.
    scale: λ.
    scope: "row" or "leaf" (where ranks are taken).
    combine: "ties" (paper: elect + fuse), "sum" or "mean".

  Returns:
    Merged parameters.
  """
  vectors = sparsify.della_drop(tv.task_vectors(base, experts), key, density, epsilon, scope=scope)
  return tv.apply(base, _combine(vectors, combine), scale)


SPARSIFIERS = ("none", "ties_trim", "dare", "breadcrumbs", "della")


def sparsify_combine(
  base: Params,
  experts: Sequence[Params],
  *,
  sparsifier: str = "ties_trim",
  combine: str = "sum",
  key: jax.Array | None = None,
  density: Any = 0.2,
  gamma: Any = 0.006,
  epsilon: Any = 0.1,
  scale: Any = 1.0,
) -> Params:
  """Any sparsifier followed by any combiner: θ = θ0 + λ · combine(sparsify(τ1..τT)).

  The named rules are fixed points of this grid (TIES = ties_trim + ties, DARE-TIES = dare + ties,
  Breadcrumbs = breadcrumbs + sum); the rest (TIES-trim + sum, Breadcrumbs + mean, ...) come free.

  Args:
    base: pre-trained parameters θ0.
    experts: fine-tuned models θt.
    sparsifier: "none", "ties_trim" (scope "model"), "dare" (1/(1−p) rescale), "breadcrumbs"
      (per leaf) or "della" (per row).
    combine: "sum", "mean" or "ties" (mass election, disjoint mean).
    key: PRNG key, required by "dare" and "della".
    density: fraction kept by the sparsifier.
    gamma: Breadcrumbs' outlier fraction.
    epsilon: DELLA's probability half-width.
    scale: λ.

  Returns:
    Merged parameters.
  """
  if sparsifier not in SPARSIFIERS:
    raise ValueError(f"sparsifier must be one of {SPARSIFIERS}, got {sparsifier!r}.")
  if sparsifier in ("dare", "della") and key is None:
    raise ValueError(f"sparsifier={sparsifier!r} is random: pass key=jax.random.key(seed).")
  vectors = tv.task_vectors(base, experts)
  if sparsifier == "ties_trim":
    vectors = sparsify.trim_top_fraction(vectors, density)
  elif sparsifier == "dare":
    vectors = sparsify.random_drop(vectors, key, density)
  elif sparsifier == "breadcrumbs":
    vectors = sparsify.breadcrumbs(vectors, density, gamma)
  elif sparsifier == "della":
    vectors = sparsify.della_drop(vectors, key, density, epsilon)
  return tv.apply(base, _combine(vectors, combine), scale)


# ------------------------------------------------------------------------- mask-based rules
def consensus(
  base: Params,
  experts: Sequence[Params],
  *,
  tall_lambda: Any = 0.4,
  min_tasks: Any = 2,
  scale: Any = 0.3,
  combine: str = "sum",
) -> Params:
  """Consensus merging (Wang et al. 2024): keep entries that ≥ k TALL masks select.

  θ = θ0 + λ · (1[Σt mt ≥ k] ⊙ τmerged), mt = 1[|τt| ≥ λt |τMTL − τt|], τMTL = Σt τt.

  Args:
    base: pre-trained parameters θ0.
    experts: fine-tuned models θt.
    tall_lambda: λt of the TALL masks (scalar or one per task; paper range [0.2, 0.6]).
    min_tasks: k (paper: 2).
    scale: λ applied to the masked merged vector.
    combine: how τmerged is formed: "sum" (Consensus TA) or "ties" (Consensus TIES, on untrimmed
      vectors).

  Returns:
    Merged parameters.
  """
  vectors = tv.task_vectors(base, experts)
  mask = combine_lib.consensus_mask(combine_lib.tall_masks(vectors, tall_lambda), min_tasks)
  merged = _combine(vectors, combine)
  return tv.apply(base, jax.tree.map(lambda m, x: jnp.where(m, x, 0.0), mask, merged), scale)


def tall_task_model(
  base: Params, experts: Sequence[Params], task: int, *, tall_lambda: Any = 0.4
) -> Params:
  """TALL-masks model for one task: θ0 + mt ⊙ τMTL (needs the task id at inference).

  Args:
    base: pre-trained parameters θ0.
    experts: fine-tuned models θt.
    task: index of the task whose model is built.
    tall_lambda: λt (scalar or one per task).

  Returns:
    Task `task`'s parameters.
  """
  vectors = tv.task_vectors(base, experts)
  mask = combine_lib.tall_masks(vectors, tall_lambda)[task]
  multi = tv.add(*vectors)
  return tv.apply(base, jax.tree.map(lambda m, x: jnp.where(m, x, 0.0), mask, multi))


class EMRMerged(NamedTuple):
  """EMR-Merging's output: one unified task vector plus a light mask and rescaler per task."""

  unified: Params  # γ ⊙ max |τt| over the tasks that agree with γ (float32).
  masks: list[Params]  # Per task: 1[τt ⊙ τuni > 0] (bool).
  rescalers: jax.Array  # [T] float32: Σ|τt| / Σ|mt ⊙ τuni|.


def emr_merging(base: Params, experts: Sequence[Params]) -> EMRMerged:
  """EMR-Merging (Huang et al. 2024): elect, then per-task masks and rescalers. Tuning-free.

  Args:
    base: pre-trained parameters θ0.
    experts: fine-tuned models θt.

  Returns:
    An `EMRMerged`; build task t's model with `emr_task_model(base, merged, t)`.
  """
  vectors = tv.task_vectors(base, experts)
  sign = combine_lib.elect_sign(vectors, election="mass")
  unified = combine_lib.disjoint_merge(vectors, sign, reduce="max")
  masks = [jax.tree.map(lambda x, u: x * u > 0, v, unified) for v in vectors]

  def total_abs(tree):
    return sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(tree))

  rescalers = []
  for v, m in zip(vectors, masks, strict=True):
    masked = total_abs(jax.tree.map(lambda mm, u: jnp.where(mm, u, 0.0), m, unified))
    rescalers.append(jnp.where(masked > 0, total_abs(v) / jnp.where(masked > 0, masked, 1.0), 0.0))
  return EMRMerged(unified=unified, masks=masks, rescalers=jnp.stack(rescalers))


def emr_task_model(base: Params, merged: EMRMerged, task: int) -> Params:
  """Materializes task `task`'s model from EMR-Merging: θ0 + λt · (mt ⊙ τuni).

  Args:
    base: pre-trained parameters θ0 (the full tree, also when only some leaves were merged).
    merged: the output of `emr_merging` (or of `merge("emr", ...)`).
    task: task index.

  Returns:
    Task `task`'s parameters, in the dtypes of `base`.
  """
  vector = jax.tree.map(lambda m, u: jnp.where(m, u, 0.0), merged.masks[task], merged.unified)
  if jax.tree.structure(vector) == jax.tree.structure(base):
    return tv.apply(base, vector, merged.rescalers[task])
  # A merge over selected leaves: `vector` is a flat {"a/b/c": leaf} dict of those leaves.
  flat_base = tree_lib.flatten(base)
  sub = {p: flat_base[p] for p in vector}
  flat_base.update(tv.apply(sub, vector, merged.rescalers[task]))
  return jax.tree.unflatten(jax.tree.structure(base), list(flat_base.values()))


# --------------------------------------------------------------------- geometric rules
def _cosine(a, b):
  na, nb = jnp.linalg.norm(a), jnp.linalg.norm(b)
  ok = (na > 0) & (nb > 0)
  return jnp.where(ok, jnp.vdot(a, b) / jnp.where(ok, na * nb, 1.0), 0.0)


def model_stock(base: Params, experts: Sequence[Params]) -> Params:
  """Model Stock (Jang et al. 2024), per leaf: θ = θ0 + t · mean τ, t = N cos / (1 + (N−1) cos).

  cos is the mean pairwise cosine between the experts' task vectors on that leaf (clipped to
  [0, 1]; a leaf where all task vectors vanish keeps θ0).

  Args:
    base: pre-trained parameters θ0 (the anchor).
    experts: at least two fine-tuned models.

  Returns:
    Merged parameters.
  """
  n = len(experts)
  if n < 2:
    raise ValueError(f"model_stock needs at least 2 experts, got {n}.")

  def merge_leaf(b, *xs):
    b32 = to_compute(b)
    taus = [(to_compute(x) - b32).ravel() for x in xs]
    pairs = [_cosine(taus[i], taus[j]) for i in range(n) for j in range(i + 1, n)]
    cos = jnp.clip(sum(pairs) / len(pairs), 0.0, 1.0)
    t = n * cos / (1.0 + (n - 1) * cos)
    return (b32 + t * sum(taus).reshape(b.shape) / n).astype(b.dtype)

  return jax.tree.map(merge_leaf, base, *experts)


def slerp(
  base: Params,
  experts: Sequence[Params],
  *,
  t: Any = 0.5,
  on: str = "weights",
  eps: float = 1e-6,
) -> Params:
  """Spherical linear interpolation between two models, leaf by leaf.

  Falls back to linear interpolation where the two vectors are (anti-)parallel or one is zero.

  Args:
    base: pre-trained parameters θ0 (used for dtypes, and as the origin when on="task_vectors").
    experts: exactly two models (a, b).
    t: interpolation weight of b, in [0, 1].
    on: "weights" (interpolate θa and θb, as mergekit) or "task_vectors" (interpolate τa and τb
      and add the result to θ0).
    eps: |cos| above 1 − eps counts as parallel.

  Returns:
    Interpolated parameters.
  """
  if len(experts) != 2:
    raise ValueError(f"slerp interpolates exactly 2 models, got {len(experts)}.")
  if on not in ("weights", "task_vectors"):
    raise ValueError(f"on must be 'weights' or 'task_vectors', got {on!r}.")

  def merge_leaf(b, xa, xb):
    origin = to_compute(b) if on == "task_vectors" else jnp.zeros((), jnp.float32)
    a, c = to_compute(xa) - origin, to_compute(xb) - origin
    cos = _cosine(a.ravel(), c.ravel())
    parallel = (jnp.abs(cos) > 1 - eps) | (cos == 0) & (
      (jnp.linalg.norm(a) == 0) | (jnp.linalg.norm(c) == 0)
    )
    omega = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
    sin = jnp.where(parallel, 1.0, jnp.sin(omega))
    wa = jnp.where(parallel, 1.0 - t, jnp.sin((1.0 - t) * omega) / sin)
    wb = jnp.where(parallel, t, jnp.sin(t * omega) / sin)
    return (origin + wa * a + wb * c).astype(b.dtype)

  return jax.tree.map(merge_leaf, base, *experts)


# ------------------------------------------------------------------------- registry + front door
REGISTRY: dict[str, Callable[..., Any]] = {
  "weight_average": weight_average,
  "task_arithmetic": task_arithmetic,
  "task_negation": task_negation,
  "ties": ties_merging,
  "dare": dare,
  "dare_ties": dare_ties,
  "breadcrumbs": breadcrumbs,
  "breadcrumbs_ties": functools.partial(breadcrumbs, combine="ties"),
  "della": della,
  "consensus": consensus,
  "emr": emr_merging,
  "model_stock": model_stock,
  "slerp": slerp,
  "sparsify_combine": sparsify_combine,
}

# Hyper-parameters that must lie in (0, 1] / [0, 1) / [0, 1]; checked on concrete values.
_FRACTIONS_OPEN_CLOSED = ("density",)
_FRACTIONS_CLOSED_OPEN = ("gamma",)
_FRACTIONS_CLOSED = ("t",)


def hparams_of(rule_name: str) -> dict[str, Any]:
  """Returns the keyword hyper-parameters of a registered rule with their defaults.

  Args:
    rule_name: key of `REGISTRY`.

  Returns:
    {name: default} (`inspect.Parameter.empty` where there is none, e.g. `key`).
  """
  if rule_name not in REGISTRY:
    raise KeyError(f"Unknown rule {rule_name!r}; known rules: {sorted(REGISTRY)}.")
  sig = inspect.signature(REGISTRY[rule_name])
  return {
    name: p.default
    for name, p in sig.parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
  }


def _check_hparams(rule_name: str, hparams: dict[str, Any]) -> None:
  known = hparams_of(rule_name)
  unknown = sorted(set(hparams) - set(known))
  if unknown:
    raise TypeError(
      f"Rule {rule_name!r} has no hyper-parameter(s) {unknown}; it takes {sorted(known)}."
    )
  if known.get("key", None) is inspect.Parameter.empty and hparams.get("key") is None:
    raise ValueError(f"Rule {rule_name!r} is random: pass key=jax.random.key(seed).")
  for name, value in hparams.items():
    if isinstance(value, str | bool) or value is None or name == "key":
      continue
    v = np.asarray(value, np.float64)
    bad = (
      (name in _FRACTIONS_OPEN_CLOSED and np.any((v <= 0) | (v > 1)))
      or (name in _FRACTIONS_CLOSED_OPEN and np.any((v < 0) | (v >= 1)))
      or (name in _FRACTIONS_CLOSED and np.any((v < 0) | (v > 1)))
    )
    if bad:
      interval = {"density": "(0, 1]", "gamma": "[0, 1)", "t": "[0, 1]"}[name]
      raise ValueError(f"{rule_name}: {name}={value} is outside {interval}.")
    if not np.all(np.isfinite(v)):
      raise ValueError(f"{rule_name}: {name}={value} is not finite.")


def _split_static(hparams: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """Strings, bools and None are static (they change the program); numbers are traced."""
  static = {k: v for k, v in hparams.items() if isinstance(v, str | bool) or v is None}
  traced = {k: v for k, v in hparams.items() if k not in static}
  traced = {
    k: (v if k == "key" else jnp.asarray(v, jnp.float32 if _is_float_like(v) else None))
    for k, v in traced.items()
  }
  return static, traced


def _is_float_like(v: Any) -> bool:
  return np.asarray(v).dtype.kind == "f"


@functools.cache
def _jitted(rule_name: str, static_items: tuple[tuple[str, Any], ...]) -> Callable[..., Any]:
  rule = functools.partial(REGISTRY[rule_name], **dict(static_items))
  return jax.jit(lambda base, experts, traced: rule(base, experts, **traced))


def merge(
  rule_name: str,
  base: Params,
  experts: Sequence[Params],
  *,
  include: str | Sequence[str] | None = None,
  exclude: str | Sequence[str] | None = None,
  others: str = "base",
  check_finite: bool = True,
  jit: bool = True,
  **hparams: Any,
) -> Any:
  """Validates the inputs and runs a registered rule (jit-compiled and cached).

  Scalars in `hparams` are passed as traced arrays, so a λ or density sweep compiles once.

  Args:
    rule_name: a key of `REGISTRY` (e.g. "ties").
    base: pre-trained parameters θ0.
    experts: fine-tuned models θt (structure, shapes and dtypes of `base`).
    include: regex(es) over "a/b/c" leaf paths to merge; None merges every leaf.
    exclude: regex(es) of leaves not to merge (e.g. heads, normalization statistics).
    others: what unmerged leaves hold: "base" (θ0) or "average" (mean of the experts).
    check_finite: raise on NaN/Inf in any input (one device reduction per leaf).
    jit: run under `jax.jit` (cached per rule and static options).
    **hparams: the rule's keyword hyper-parameters (see `hparams_of(rule_name)`).

  Returns:
    Merged parameters with the structure and dtypes of `base` (an `EMRMerged` for "emr").

  Raises:
    KeyError / TypeError / ValueError: unknown rule or hyper-parameter, out-of-range value,
      mismatched trees (the message names the leaf path), non-finite values.
  """
  _check_hparams(rule_name, hparams)
  experts = list(experts)
  if not experts:
    raise ValueError("merge() needs at least one expert.")
  if others not in ("base", "average"):
    raise ValueError(f"others must be 'base' or 'average', got {others!r}.")
  tree_lib.check_compatible(base, experts)
  if check_finite:
    tree_lib.check_finite(base, name="base")
    for i, e in enumerate(experts):
      tree_lib.check_finite(e, name=f"experts[{i}]")

  static, traced = _split_static(hparams)
  if jit:
    fn = _jitted(rule_name, tuple(sorted(static.items())))
  else:
    rule = functools.partial(REGISTRY[rule_name], **static)
    fn = lambda b, es, kw: rule(b, es, **kw)  # noqa: E731

  # Merge only the selected leaves, as flat {"a/b/c": leaf} dicts: their key paths spell the same
  # "a/b/c" names, so per-leaf PRNG keys and masks are those of a whole-tree merge.
  subset = include is not None or exclude is not None
  if subset:
    predicate = tree_lib.path_predicate(include, exclude)
    flat_base = tree_lib.flatten(base)
    flat_experts = [tree_lib.flatten(e) for e in experts]
    chosen = [p for p in flat_base if predicate(p)]
    if not chosen:
      raise ValueError(
        f"include={include!r}, exclude={exclude!r} select no leaf; paths look like "
        f"{list(flat_base)[:5]}."
      )
    merge_base = {p: flat_base[p] for p in chosen}
    merge_experts = [{p: e[p] for p in chosen} for e in flat_experts]
  else:
    merge_base, merge_experts = base, experts

  if _wants_eager_trim(rule_name, static):
    traced["trim_stats"] = sparsify.trim_stats_eager(
      merge_base,
      merge_experts,
      hparams.get("density", hparams_of(rule_name)["density"]),
      scope=static.get("trim_scope", "model"),
    )
  merged = fn(merge_base, merge_experts, traced)
  if not subset or rule_name == "emr":
    return merged

  rest = {p: flat_base[p] for p in flat_base if p not in merged}
  if others == "average" and rest:
    rest = weight_average(rest, [{p: e[p] for p in rest} for e in flat_experts])
  out = {p: merged[p] if p in merged else rest[p] for p in flat_base}
  return jax.tree.unflatten(jax.tree.structure(base), list(out.values()))


def _wants_eager_trim(rule_name: str, static: dict[str, Any]) -> bool:
  """TIES on CPU with automatic selection: select in NumPy outside jit (see trim_stats_eager)."""
  return (
    "trim_stats" in hparams_of(rule_name)
    and static.get("selection_method", "auto") == "auto"
    and jax.default_backend() == "cpu"
  )
