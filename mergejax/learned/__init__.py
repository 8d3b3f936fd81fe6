"""Learned merging: coefficients of a parametrization trained by one optax loop.

* `methods`: the registry `METHODS` ("coefficients", "dv_basi"), `run(problem, config)`;
  AdaMerging, AdaMerging++, aTLAS and DV-BASI are recipes (configs/learned/*.py).
* `problem`: `LearnProblem` (what a method takes), `LearnedMerge` (what it returns),
  `CompileCache` (explicit compile reuse across runs), `TracedTaskApply` (an apply_fn that takes
  a traced task index: one program for every task).
* `parametrizations`: `Parametrization(init, merge, project)`; `blockwise_scaling` is
  θ0 + Σ_k Λ_k ⊙ v_k with one Λ per basis vector and block.
* `objectives`: entropy, cross-entropy, aTLAS's UFM, ... built by `objectives.make(spec)`.
* `bases`: task vectors, AdaMerging++'s TIES split, DARE.
* `loop`: the training loop (`train`), resumable and bit-identical after a kill.
* `mgda`: the min-norm combination of per-task gradients.
* `sharding`: the ("data", "model") mesh of `config.mesh`: θ0 and the basis split over "model",
  batches over "data", Λ replicated.
"""

from mergejax.learned.methods import METHODS, coefficients, dv_basi, run
from mergejax.learned.parametrizations import Parametrization, blockwise_scaling, make_blocks
from mergejax.learned.problem import (
  CompileCache,
  LearnedMerge,
  LearnProblem,
  TracedTaskApply,
  traced_task,
)

__all__ = [
  "METHODS",
  "CompileCache",
  "LearnProblem",
  "LearnedMerge",
  "Parametrization",
  "TracedTaskApply",
  "blockwise_scaling",
  "coefficients",
  "dv_basi",
  "make_blocks",
  "run",
  "traced_task",
]
