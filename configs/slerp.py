r"""SLERP between exactly two models, leaf by leaf (t = weight of the second).

  python launch/merge.py --config=configs/slerp.py \
      --config.base=BASE --config.experts=E1,E2,... --workdir=/tmp/slerp
"""

from configs import default


def get_config(arg: str = ""):
  """Returns the config (paper defaults; see ../shared/METHODS.md)."""
  del arg
  return default.with_rule("slerp", t=0.5, on="weights")
