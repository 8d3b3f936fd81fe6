r"""TIES-Merging as FusionBench runs it: disjoint sum, λ = 0.3 (paper: disjoint mean, λ = 1).

  python launch/merge.py --config=configs/ties_fusionbench.py \
      --config.base=BASE --config.experts=E1 --config.experts=E2 --workdir=/tmp/ties_fusionbench
"""

from configs import merge


def get_config(arg: str = ""):
  """Returns configs/merge.py's TIES config with FusionBench's reduce and λ."""
  del arg
  config = merge.get_config("ties")
  config.rule.reduce = "sum"
  config.rule.scale = 0.3
  return config
