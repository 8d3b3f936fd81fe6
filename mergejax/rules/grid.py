"""The whole sparsify × combine grid: θ = θ0 + λ · combine(sparsify(τ1..τT)) for any sparsifier of
`mergejax.sparsify.SPARSIFIERS` and any combiner; the named rules of `rules.sparse` are its points.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from mergejax import sparsify
from mergejax import task_vectors as tv
from mergejax.rules import spec
from mergejax.rules.sparse import COMBINE, _combine, _ties_prepare, _ties_stream_stats
from mergejax.tree import Params

# Which rule's paper defaults a sparsifier takes in `sparsify_combine` (one source per default).
_DEFAULTS_FROM = {
  "ties_trim": "ties",
  "dare": "dare",
  "breadcrumbs": "breadcrumbs",
  "della": "della",
}


def sparsify_combine(
  base: Params,
  experts: Sequence[Params],
  *,
  sparsifier: str = "ties_trim",
  combine: str = "sum",
  key: jax.Array | None = None,
  density: Any = None,
  gamma: Any = None,
  epsilon: Any = None,
  scale: Any = 1.0,
) -> Params:
  """Any sparsifier followed by any combiner: θ = θ0 + λ · combine(sparsify(τ1..τT)).

  The named rules are fixed points of this grid (TIES = ties_trim + ties, DARE-TIES = dare + ties,
  Breadcrumbs = breadcrumbs + sum); the rest (TIES-trim + sum, Breadcrumbs + mean, ...) come free.

  Args:
    base: pre-trained parameters θ0.
    experts: fine-tuned models θt.
    sparsifier: a key of `sparsify.SPARSIFIERS`: "none", "ties_trim" (scope "model"), "dare"
      (1/(1−p) rescale), "breadcrumbs" or "della" (per output neuron of flax kernels).
    combine: "sum", "mean" or "ties" (mass election, disjoint mean).
    key: PRNG key, required by the random sparsifiers ("dare", "della").
    density: fraction kept by the sparsifier; None takes the matching rule's paper default
      (TIES 0.2, DARE 0.1, Breadcrumbs 0.15, DELLA 0.7).
    gamma: Breadcrumbs' outlier fraction; None: Breadcrumbs' default.
    epsilon: DELLA's probability half-width; None: DELLA's default.
    scale: λ.

  Returns:
    Merged parameters.
  """
  given = dict(density=density, gamma=gamma, epsilon=epsilon)
  return _with_stats(
    base, experts, None, sparsifier=sparsifier, combine=combine, key=key, scale=scale, **given
  )


def _resolved(sparsifier, given):
  """The sparsifier's hyper-parameters, None taking the matching rule's default."""
  names = sparsify.SPARSIFIERS[sparsifier].hparams
  defaults = spec.REGISTRY[_DEFAULTS_FROM.get(sparsifier, "ties")].defaults
  return {n: defaults[n] if given[n] is None else given[n] for n in names}


def _with_stats(base, experts, trim_stats, *, sparsifier, combine, key, scale, **given):
  # With `trim_stats` (the "ties_trim" sparsifier's model-wide thresholds, from `_prepare` or
  # `_stream_stats`, as TIES takes them) the trim is a comparison inside jit.
  if sparsify.SPARSIFIERS[sparsifier].random and key is None:
    raise ValueError(f"sparsifier={sparsifier!r} is random: pass key=jax.random.key(seed).")
  hparams = _resolved(sparsifier, given)
  if trim_stats is not None:
    vectors, _ = sparsify.trim_experts(base, experts, hparams["density"], stats=trim_stats)
  else:
    vectors = sparsify.apply_sparsifier(
      sparsifier, tv.task_vectors(base, experts), key=key, **hparams
    )
  return tv.apply(base, _combine(vectors, combine), scale)


# The "ties_trim" sparsifier's statistics are TIES's (model scope, "round" counting): its hooks.
_TIES_TRIM = dict(trim_scope="model", counting="round", election="mass")


def _prepare(base, experts, *, sparsifier, density, **unused):
  del unused
  if sparsifier != "ties_trim":
    return None
  density = _resolved(sparsifier, dict(density=density))["density"]
  return _ties_prepare(base, experts, density=density, **_TIES_TRIM)


def _stream_stats(leaves, sizes, *, sparsifier, density, memory_budget=None, **unused):
  del unused
  if sparsifier != "ties_trim":
    return lambda i: None
  density = _resolved(sparsifier, dict(density=density))["density"]
  return _ties_stream_stats(
    leaves, sizes, density=density, memory_budget=memory_budget, **_TIES_TRIM
  )


def _elementwise(hparams, ndim=None) -> bool:
  # Breadcrumbs and DELLA rank within rows; the others keep or drop each entry on its own.
  del ndim
  return hparams["sparsifier"] in ("none", "ties_trim", "dare")


spec.register(
  "sparsify_combine",
  sparsify_combine,
  row_split=_elementwise,
  elementwise=_elementwise,
  prepare=_prepare,
  with_stats=_with_stats,
  stream_stats=_stream_stats,
  sparsifier=spec.choice(*sparsify.SPARSIFIERS),
  combine=COMBINE,
  key=spec.HParam("key", optional=True),
  density=spec.HParam("float", 0.0, 1.0, "(]", optional=True),
  gamma=spec.HParam("float", 0.0, 1.0, "[)", optional=True),
  epsilon=spec.HParam("float", 0.0, 1.0, "[)", optional=True),
  scale=spec.SCALE,
)
