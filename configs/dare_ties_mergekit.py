r"""DARE-TIES as mergekit runs it (`merge_method: dare_ties`), with mergekit's meanings.

  python launch/merge.py --config=configs/dare_ties_mergekit.py \
      --config.base=BASE --config.experts=E1 --config.experts=E2 \
      --config.rule.density=0.5 --config.rule.weights="(1.0, 0.5)" --workdir=/tmp/dare_ties_mk

mergekit → mergejax: `density` → rule.density (keep probability), `weight` → rule.weights
(after the drop, before the election), `rescale: true` → rule.rescale="l1" (each tensor's L1 norm
restored; `false` → "none"), `normalize: false` (mergekit's default here) → rule.reduce="sum"
(`true` → "mean"), `lambda` → rule.scale. No TIES trim (rule.trim_density=None; the DARE paper's
code, mergejax's default, trims 20%). Counting rule of the anchor: none, each entry is kept with
probability density. The draws differ (mergekit uses torch's global RNG, mergejax one key per
expert and leaf); launch/check_mergekit.py compares them at density 1 (element for element) and by
statistics below 1. mergekit's defaults: density 1.0, λ 1.
"""

from configs import merge


def get_config(arg: str = ""):
  """Returns configs/merge.py's DARE-TIES config with mergekit's rescale, reduce and defaults."""
  del arg
  config = merge.get_config("dare_ties")
  config.rule.rescale = "l1"
  config.rule.reduce = "sum"
  config.rule.trim_density = None
  config.rule.density = 1.0
  config.rule.scale = 1.0
  return config
