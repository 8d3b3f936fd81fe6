r"""TIES as mergekit runs it (`merge_method: ties`), with mergekit's hyper-parameter meanings.

  python launch/merge.py --config=configs/ties_mergekit.py \
      --config.base=BASE --config.experts=E1 --config.experts=E2 \
      --config.rule.density=0.2 --config.rule.weights="(1.0, 0.5)" --workdir=/tmp/ties_mergekit

mergekit → mergejax: `density` → rule.density (kept fraction per tensor); `weight` (one per model)
→ rule.weights (multiplies each trimmed τt before the sign election; the disjoint mean divides by
the agreeing models' Σ weight); `normalize: false` → rule.reduce="sum"; `lambda` → rule.scale;
`consensus_method: count` → rule.election="count". Counting rule of the anchor: per tensor,
k = max(1, int(density · n)) entries kept (mergejax's default: clip(round(density · n), 1, n)
over the whole task vector). mergekit's defaults are taken: density 1.0 (no trim), λ 1. Checked
element for element against mergekit by launch/check_mergekit.py (see README).
"""

from configs import merge


def get_config(arg: str = ""):
  """Returns configs/merge.py's TIES config with mergekit's scope, counting and defaults."""
  del arg
  config = merge.get_config("ties")
  config.rule.trim_scope = "leaf"
  config.rule.counting = "mergekit"
  config.rule.reduce = "mean"  # mergekit's ties: normalize = true.
  config.rule.density = 1.0
  config.rule.scale = 1.0
  return config
