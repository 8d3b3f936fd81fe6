r"""TIES-Merging as FusionBench runs it: disjoint sum, λ = 0.3.

  python launch/merge.py --config=configs/ties_fusionbench.py \
      --config.base=BASE --config.experts=E1,E2,... --workdir=/tmp/ties_fusionbench
"""

from configs import default


def get_config(arg: str = ""):
  """Returns the config (paper defaults; see ../shared/METHODS.md)."""
  del arg
  return default.with_rule(
    "ties", density=0.2, scale=0.3, trim_scope="model", election="mass", reduce="sum"
  )
