r"""DARE + task arithmetic: drop p = 0.9, rescale 1/(1−p).

  python launch/merge.py --config=configs/dare.py \
      --config.base=BASE --config.experts=E1,E2,... --workdir=/tmp/dare
"""

from configs import default


def get_config(arg: str = ""):
  """Returns the config (paper defaults; see ../shared/METHODS.md)."""
  del arg
  return default.with_rule("dare", density=0.1, scale=1.0, rescale="inverse", combine="sum")
