"""Learned merging coefficients: one parametrization, objectives, MGDA, one training loop.

θ(Λ) = θ0 + Σ_k Λ_k ⊙ v_k with Λ per (basis vector, block); AdaMerging, AdaMerging++, aTLAS and
DV-BASI are configs of the same loop (see configs/ and `methods`).
"""

from mergejax.learned.coefficients import (
  Blocks,
  clamp_coefficients,
  init_coefficients,
  make_blocks,
  merge_with_coefficients,
)
from mergejax.learned.loop import LearnResult, learn_coefficients
from mergejax.learned.methods import DVBasiResult, adamerging, adamerging_plus, atlas, dv_basi, run
from mergejax.learned.mgda import min_norm_combination

__all__ = [
  "Blocks",
  "DVBasiResult",
  "LearnResult",
  "adamerging",
  "adamerging_plus",
  "atlas",
  "clamp_coefficients",
  "dv_basi",
  "init_coefficients",
  "learn_coefficients",
  "make_blocks",
  "merge_with_coefficients",
  "min_norm_combination",
  "run",
]
