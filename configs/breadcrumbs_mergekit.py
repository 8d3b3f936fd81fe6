r"""Model Breadcrumbs as mergekit runs it (`merge_method: breadcrumbs`), with mergekit's meanings.

  python launch/merge.py --config=configs/breadcrumbs_mergekit.py \
      --config.base=BASE --config.experts=E1 --config.experts=E2 \
      --config.rule.density=0.9 --config.rule.gamma=0.01 --workdir=/tmp/breadcrumbs_mergekit

mergekit → mergejax: `density` → rule.density (fraction of each tensor kept), `gamma` →
rule.gamma (fraction of largest |τ| dropped), `weight` → rule.weights, `lambda` → rule.scale,
`normalize: true` → rule.combine="mean" (÷ Σ weight). Counting rule of the anchor (mergekit's
`magnitude_outliers`): per tensor of n entries, n_keep = int(density · n), n_top = int(gamma · n)
lowered to n − n_keep when both do not fit, and density 1 leaves the tensor untouched; the masks
are per tensor, not per output neuron as in the reference code (mergejax's default). mergekit's
defaults: density 1.0, gamma 0.01, λ 1, a plain (weighted) sum. Checked element for element
against mergekit by launch/check_mergekit.py (see README).
"""

from configs import merge


def get_config(arg: str = ""):
  """Returns configs/merge.py's Breadcrumbs config with mergekit's scope, counting and defaults."""
  del arg
  config = merge.get_config("breadcrumbs")
  config.rule.scope = "leaf"
  config.rule.counting = "mergekit"
  config.rule.combine = "sum"
  config.rule.density = 1.0
  config.rule.gamma = 0.01
  config.rule.scale = 1.0
  return config
