"""Mask-based rules: Consensus merging, TALL masks and EMR-Merging (the latter two per task)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mergejax import combine as combine_lib
from mergejax import leafwise, sparsify
from mergejax import task_vectors as tv
from mergejax.rules import spec
from mergejax.rules.averaging import elementwise
from mergejax.rules.sparse import _combine
from mergejax.rules.task_specific import TaskSpecificMerge, masked_apply
from mergejax.tree import Params


def _masked(mask: Params, vector: Params) -> Params:
  return jax.tree.map(lambda m, x: jnp.where(m, x, 0.0), mask, vector)


CONSENSUS_COMBINES = ("sum", "ties", "ties_untrimmed", "mean")


def consensus(
  base: Params,
  experts: Sequence[Params],
  *,
  tall_lambda: Any = 0.4,
  min_tasks: Any = 2,
  scale: Any = 0.3,
  combine: str = "sum",
  density: Any = 0.2,
) -> Params:
  """Consensus merging (Wang et al. 2024): keep entries that ≥ k TALL masks select.

  θ = θ0 + λ · (1[Σt mt ≥ k] ⊙ τmerged), mt = 1[|τt| ≥ λt |τmerged − τt|].

  As the reference code (nik-dim/tall_masks): Consensus TA takes τmerged = Σt τt; Consensus TIES
  runs TIES first (top `density` of each whole task vector, mass election, disjoint *sum*) and
  builds the masks against θ0 + τ_TIES. λt is one per task (the benchmark chooses them on
  validation) or one for all.

  Args:
    base: pre-trained parameters θ0.
    experts: fine-tuned models θt.
    tall_lambda: λt of the TALL masks (scalar or one per task; paper range [0.2, 0.6]).
    min_tasks: k (paper: 2).
    scale: λ applied to the masked merged vector.
    combine: τmerged: "sum" (Consensus TA), "ties" (Consensus TIES, reference), "ties_untrimmed"
      (mergejax before issue 10: untrimmed τt, disjoint mean, masks against Σt τt) or "mean".
    density: the TIES trim of "ties" (reference: 0.2); unused otherwise.

  Returns:
    Merged parameters.
  """
  if combine not in CONSENSUS_COMBINES:
    raise ValueError(f"combine must be one of {CONSENSUS_COMBINES}, got {combine!r}.")
  vectors = tv.task_vectors(base, experts)
  if combine == "ties":
    trimmed = sparsify.trim_top_fraction(vectors, density, scope="model")
    merged = combine_lib.ties_combine(trimmed, reduce="sum")
    masks = combine_lib.tall_masks(vectors, tall_lambda, multi=merged)
  else:
    merged = _combine(vectors, "ties" if combine == "ties_untrimmed" else combine)
    masks = combine_lib.tall_masks(vectors, tall_lambda)
  mask = combine_lib.consensus_mask(masks, min_tasks)
  return tv.apply(base, _masked(mask, merged), scale)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TallMerged(TaskSpecificMerge):
  """TALL masks' output: the multi-task vector τMTL = Σt τt and one boolean mask per task.

  Task t's model is θ0 + mt ⊙ τMTL (needs the task id at inference).
  """

  multi: Params
  masks: list[Params]

  @property
  def num_tasks(self) -> int:
    return len(self.masks)

  def task_model(self, base: Params, task: int) -> Params:
    return masked_apply(base, self.masks[task], self.multi)


def tall_masks(base: Params, experts: Sequence[Params], *, tall_lambda: Any = 0.4) -> TallMerged:
  """TALL masks (Wang et al. 2024): per-task masks over the multi-task vector.

  Args:
    base: pre-trained parameters θ0.
    experts: fine-tuned models θt.
    tall_lambda: λt (scalar or one per task; the paper searches [0.2, 0.6] on validation).

  Returns:
    A `TallMerged`; task t's model is `result.task_model(base, t)`.
  """
  vectors = tv.task_vectors(base, experts)
  return TallMerged(multi=tv.add(*vectors), masks=combine_lib.tall_masks(vectors, tall_lambda))


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
  return tall_masks(base, experts, tall_lambda=tall_lambda).task_model(base, task)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EMRMerged(TaskSpecificMerge):
  """EMR-Merging's output: one unified task vector plus a light mask and rescaler per task.

  Attributes:
    unified: γ ⊙ max |τt| over the tasks that agree with γ (float32).
    masks: per task, 1[τt ⊙ τuni > 0] (bool).
    rescalers: [T] float32, Σ|τt| / Σ|mt ⊙ τuni| (sums over entries, or of per-tensor means).
  """

  unified: Params
  masks: list[Params]
  rescalers: jax.Array

  @property
  def num_tasks(self) -> int:
    return len(self.masks)

  def task_model(self, base: Params, task: int) -> Params:
    """θ0 + λt · (mt ⊙ τuni), in the dtypes of `base`."""
    return masked_apply(base, self.masks[task], self.unified, self.rescalers[task])


EMR_RESCALERS = ("tensor_mean", "paper")


def emr_merging(
  base: Params, experts: Sequence[Params], *, rescaler: str = "tensor_mean"
) -> EMRMerged:
  """EMR-Merging (Huang et al. 2024): elect, then per-task masks and rescalers. Tuning-free.

  The rescaler λt = Σ|τt| / Σ|mt ⊙ τuni|. The official code (harveyhuang/EMR_Merging) sums per
  tensor *means* ("tensor_mean", default: the published numbers come from it), so every tensor,
  a bias or a LayerNorm scale as much as a 2-D weight, weighs the same; the paper's equation sums
  over all entries ("paper"), where the large weights dominate.

  Args:
    base: pre-trained parameters θ0.
    experts: fine-tuned models θt.
    rescaler: "tensor_mean" (official code) or "paper".

  Returns:
    An `EMRMerged`; build task t's model with `result.task_model(base, t)`.
  """
  vectors = tv.task_vectors(base, experts)
  sign = combine_lib.elect_sign(vectors, election="mass")
  unified = combine_lib.disjoint_merge(vectors, sign, reduce="max")
  masks = [jax.tree.map(lambda x, u: x * u > 0, v, unified) for v in vectors]

  if rescaler not in EMR_RESCALERS:
    raise ValueError(f"rescaler must be one of {EMR_RESCALERS}, got {rescaler!r}.")

  def leaf_term(x):
    if rescaler == "paper":
      return jnp.sum(jnp.abs(x))
    # The mean as a sum of |x| / n: a term that ends in a multiply (XLA makes x / n one) would
    # be fused with the add of the next leaf's term into one FMA, a rounding the streaming
    # engine, which adds the leaves' partials one by one, does not make (1 ulp off).
    return jnp.sum(jnp.abs(x) * (1.0 / x.size))

  def total_abs(tree):
    return leafwise.total(sum(leaf_term(x) for x in jax.tree.leaves(tree)))

  rescalers = []
  for v, m in zip(vectors, masks, strict=True):
    masked = total_abs(_masked(m, unified))
    rescalers.append(jnp.where(masked > 0, total_abs(v) / jnp.where(masked > 0, masked, 1.0), 0.0))
  return EMRMerged(unified=unified, masks=masks, rescalers=jnp.stack(rescalers))


def emr_task_model(base: Params, merged: EMRMerged, task: int) -> Params:
  """Task `task`'s model from EMR-Merging: `merged.task_model(base, task)`.

  Args:
    base: pre-trained parameters θ0.
    merged: the output of `emr_merging` (or of `merge("emr", ...)`, subsets included).
    task: task index.

  Returns:
    Task `task`'s parameters, in the dtypes of `base`.
  """
  return merged.task_model(base, task)


def _elementwise_consensus(hparams, ndim=None) -> bool:
  # Consensus TA / mean: every entry on its own (TIES's trim and election take whole-model ones).
  del ndim
  return hparams["combine"] in ("sum", "mean")


_TALL_LAMBDA = spec.HParam("per_expert", low=0.0)
spec.register(
  "consensus",
  consensus,
  row_split=_elementwise_consensus,
  elementwise=_elementwise_consensus,
  tall_lambda=_TALL_LAMBDA,
  min_tasks=spec.HParam("int", low=1),
  scale=spec.SCALE,
  combine=spec.choice(*CONSENSUS_COMBINES),
  density=spec.FRACTION,
)
# Every entry of every task model on its own (no `row_split`: blocks of rows give one output).
spec.register("tall_masks", tall_masks, elementwise=elementwise, tall_lambda=_TALL_LAMBDA)
# Given its whole-model sums (the rescalers'), every entry of every task model on its own.
spec.register("emr", emr_merging, elementwise=elementwise, rescaler=spec.choice(*EMR_RESCALERS))
