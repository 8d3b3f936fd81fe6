r"""DARE-TIES: DARE's drop and rescale, TIES's election and disjoint mean.

  python launch/merge.py --config=configs/dare_ties.py \
      --config.base=BASE --config.experts=E1,E2,... --workdir=/tmp/dare_ties
"""

from configs import default


def get_config(arg: str = ""):
  """Returns the config (paper defaults; see ../shared/METHODS.md)."""
  del arg
  return default.with_rule(
    "dare_ties", density=0.1, scale=1.0, rescale="inverse", election="mass", reduce="mean"
  )
