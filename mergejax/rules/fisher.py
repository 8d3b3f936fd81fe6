"""Fisher merging (Matena & Raffel, NeurIPS 2022): a per-entry average weighted by each expert's
diagonal Fisher information.

θ = Σt ct F̃t ⊙ θt / Σt ct F̃t, leaf by leaf and entry by entry, where Ft is expert t's diagonal
Fisher (`mergejax.statistics.fisher_statistics`), F̃t the Fisher with a floor against division
by zero, and ct a per-expert coefficient. Every merged leaf is Fisher-weighted (none is simply
averaged: a leaf whose Fisher is zero everywhere gets the ct-weighted mean through the floor).

Defaults are FusionBench's (`merging_with_fisher_weights`, from MergeLM), the anchor METHODS.md
names for this rule:
* the floor is added, F̃t = Ft + ε with ε = `min_weight` = 1e-6 (`floor="add"`);
* `normalize=True` divides each expert's Fisher by its L2 norm over all merged leaves:
  ct = wt · nt with nt = (1 / (‖Ft‖ + ε)) / Σs (1 / (‖Fs‖ + ε)), so that an expert whose Fisher
  is large overall (a bigger loss, a sharper model) does not dominate every entry;
* wt = 1/T (`weights=None`), FusionBench's `fisher_scaling_coefficients`.
Matena & Raffel's own code floors instead, F̃t = max(Ft, ε), and normalizes by ct = wt / ‖Ft‖
(`floor="max"`). Any positive rescaling of all ct together cancels, so only ratios matter.

Arithmetic is float32; outputs have the dtypes of `base`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mergejax import tree as tree_lib
from mergejax.rules import spec
from mergejax.rules import statistics_check as check_lib
from mergejax.tree import Params, to_compute

FLOORS = ("add", "max")


def fisher_merging(
  base: Params,
  experts: Sequence[Params],
  statistics: Sequence[Any],
  *,
  weights: Any = None,
  normalize: bool = True,
  min_weight: Any = 1e-6,
  floor: str = "add",
) -> Params:
  """Fisher merging: θ = Σt ct F̃t θt / Σt ct F̃t per entry.

  Args:
    base: pre-trained parameters (only their structure and dtypes are used).
    experts: fine-tuned models θt.
    statistics: one dict per expert with "fisher": its diagonal Fisher, a tree shaped like the
      parameters (`mergejax.statistics.fisher_statistics`).
    weights: per-expert coefficients wt (None: 1/T each; a scalar or one per expert).
    normalize: divide each expert's Fisher by its L2 norm over all merged leaves.
    min_weight: ε, the floor of the Fisher weights (and the guard of the norms).
    floor: "add" (F + ε; FusionBench / MergeLM) or "max" (max(F, ε); Matena & Raffel's code).

  Returns:
    Merged parameters in the dtypes of `base`.

  >>> base = {"w": jnp.zeros(2)}
  >>> experts = [{"w": jnp.array([1.0, 1.0])}, {"w": jnp.array([3.0, 3.0])}]
  >>> stats = [{"fisher": {"w": jnp.array([1.0, 3.0])}}, {"fisher": {"w": jnp.array([3.0, 1.0])}}]
  >>> fisher_merging(base, experts, stats, normalize=False, min_weight=0.0)["w"]
  Array([2.5, 1.5], dtype=float32)
  """
  if floor not in FLOORS:
    raise ValueError(f"floor must be one of {FLOORS}, got {floor!r}.")
  n = len(experts)
  fishers = [tree_lib.flatten(s["fisher"]) for s in statistics]
  paths = [p for p, b in tree_lib.flatten(base).items() if tree_lib.is_float(b)]
  w = jnp.full((n,), 1.0 / n) if weights is None else jnp.broadcast_to(jnp.float32(weights), (n,))
  if normalize:
    # One L2 norm per expert over every merged leaf (FusionBench's get_models_fisher_norm).
    norms = jnp.stack(
      [jnp.sqrt(sum(jnp.sum(jnp.square(to_compute(f[p]))) for p in paths)) for f in fishers]
    )
    if floor == "add":
      inverse = 1.0 / (norms + min_weight)
      w = w * inverse / jnp.sum(inverse)
    else:
      w = w / norms

  def leaf(key_path, b, *xs):
    if not tree_lib.is_float(b):
      return b
    path = tree_lib.path_str(key_path)
    num, den = 0.0, 0.0
    for t, x in enumerate(xs):
      f = to_compute(fishers[t][path])
      f = f + min_weight if floor == "add" else jnp.maximum(f, min_weight)
      num = num + w[t] * f * to_compute(x)
      den = den + w[t] * f
    return (num / den).astype(b.dtype)

  return jax.tree.map_with_path(leaf, base, *experts)


def _fisher_for(base, selected, statistics, hparams, num_experts):
  del hparams
  rule = "fisher"
  flats = check_lib.per_expert(
    rule, statistics, num_experts, kind="fisher", source="fisher_statistics"
  )
  check_lib.check_known(rule, flats, set(tree_lib.leaf_paths(base)), "fisher")
  for t, flat in enumerate(flats):
    for path, leaf in selected.items():
      if path not in flat:
        raise ValueError(
          f"{rule}: leaf {path!r} has no Fisher in statistics[{t}]; compute the statistics on "
          "every leaf you merge (mergejax.statistics.fisher_statistics on these parameters), or "
          "exclude= the leaf."
        )
      if tuple(jnp.shape(flat[path])) != tuple(jnp.shape(leaf)):
        raise ValueError(
          f"{rule}: leaf {path!r} has shape {tuple(jnp.shape(leaf))} but its Fisher in "
          f"statistics[{t}] has shape {tuple(jnp.shape(flat[path]))}."
        )
  return [{"fisher": {p: f[p] for p in selected}} for f in flats]


def _check_weights(hparams: dict[str, Any], num_experts: int) -> None:
  del num_experts
  w = hparams["weights"]
  if w is not None and not isinstance(w, jax.core.Tracer) and float(jnp.sum(jnp.asarray(w))) <= 0:
    raise ValueError(f"fisher: weights={w!r} must have a positive sum.")


spec.register(
  "fisher",
  fisher_merging,
  weights=spec.HParam("per_expert", low=0.0, optional=True),
  normalize=spec.HParam("bool"),
  min_weight=spec.HParam("float", 0.0, None, "[]"),
  floor=spec.choice(*FLOORS),
  statistics=_fisher_for,
  check=_check_weights,
)
