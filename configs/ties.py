r"""TIES-Merging, paper defaults: top 20% over the whole model, mass election, disjoint mean, λ=1.

  python launch/merge.py --config=configs/ties.py \
      --config.base=BASE --config.experts=E1,E2,... --workdir=/tmp/ties
"""

from configs import default


def get_config(arg: str = ""):
  """Returns the config (paper defaults; see ../shared/METHODS.md)."""
  del arg
  return default.with_rule(
    "ties", density=0.2, scale=1.0, trim_scope="model", election="mass", reduce="mean"
  )
