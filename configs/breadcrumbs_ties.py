r"""Breadcrumbs masks, then TIES election and disjoint mean.

  python launch/merge.py --config=configs/breadcrumbs_ties.py \
      --config.base=BASE --config.experts=E1,E2,... --workdir=/tmp/breadcrumbs_ties
"""

from configs import default


def get_config(arg: str = ""):
  """Returns the config (paper defaults; see ../shared/METHODS.md)."""
  del arg
  return default.with_rule("breadcrumbs_ties", density=0.15, gamma=0.006, scale=0.2, scope="leaf")
