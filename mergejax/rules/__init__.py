"""Merge rules: pure functions `(base, experts, **hparams) -> merged params`.

Each rule is a few lines composed from `task_vectors` (algebra), `sparsify` (trim / random drop /
Breadcrumbs / DELLA) and `combine` (sum, mean, sign election + disjoint merge), registered with a
spec of its hyper-parameters (`spec.register`). Rules are jit-able and leave jit to the caller;
`merge` is the validated, jit-cached front door.

Conventions:
* `base` is θ0; `experts` is a list of θt with the structure, shapes and dtypes of `base`.
* Arithmetic is float32; the output has the dtypes of `base`.
* `scale` (λ) and fractions (`density`, `gamma`, ...) may be traced: a sweep reuses one compile.
* Random rules take an explicit `key`; masks come from one key per (expert, leaf path).
* Rules that build one model per task (EMR, TALL masks) return a `TaskSpecificMerge`.
* Data-dependent rules (Fisher merging, RegMean, RegMean++) take the experts' statistics as a
  third argument, `(base, experts, statistics, **hparams)`; `mergejax.statistics` computes them
  from a model and data, and `merge(..., statistics=...)` checks them against the parameters.

Modules: `spec` (the registry), `averaging`, `sparse`, `per_row` (Breadcrumbs, DELLA), `grid`,
`masks`, `geometric`, `spectral` (TSV, ISO), `magmax`, `fisher`, `regmean` (the rules),
`statistics_check` (validation of the data-dependent rules' statistics), `task_specific`
(per-task results), `front_door` (`merge`).
"""

from mergejax.rules.averaging import task_arithmetic, task_negation, weight_average
from mergejax.rules.fisher import fisher_merging
from mergejax.rules.front_door import lower, merge
from mergejax.rules.geometric import model_stock, slerp
from mergejax.rules.grid import sparsify_combine
from mergejax.rules.magmax import magmax
from mergejax.rules.masks import (
  EMRMerged,
  TallMerged,
  consensus,
  emr_merging,
  emr_task_model,
  tall_masks,
  tall_task_model,
)
from mergejax.rules.per_row import breadcrumbs, della
from mergejax.rules.regmean import regmean, regmean_plusplus
from mergejax.rules.sparse import dare, dare_ties, ties_merging
from mergejax.rules.spec import (
  REGISTRY,
  HParam,
  RuleSpec,
  add_key,
  hparams_of,
  register,
)
from mergejax.rules.spectral import (
  TsvCompressed,
  iso_c,
  iso_cts,
  tsv_compress,
  tsv_merging,
)
from mergejax.rules.task_specific import TaskSpecificMerge, task_models

__all__ = [
  "REGISTRY",
  "EMRMerged",
  "HParam",
  "RuleSpec",
  "TallMerged",
  "TsvCompressed",
  "TaskSpecificMerge",
  "add_key",
  "breadcrumbs",
  "consensus",
  "dare",
  "dare_ties",
  "della",
  "emr_merging",
  "emr_task_model",
  "fisher_merging",
  "hparams_of",
  "iso_c",
  "iso_cts",
  "lower",
  "magmax",
  "merge",
  "model_stock",
  "register",
  "regmean",
  "regmean_plusplus",
  "slerp",
  "sparsify_combine",
  "tall_masks",
  "tall_task_model",
  "task_arithmetic",
  "task_models",
  "task_negation",
  "ties_merging",
  "tsv_compress",
  "tsv_merging",
  "weight_average",
]
