r"""Weight averaging (model soup): θ = mean of the experts.

  python launch/merge.py --config=configs/weight_average.py \
      --config.base=BASE --config.experts=E1,E2,... --workdir=/tmp/weight_average
"""

from configs import default


def get_config(arg: str = ""):
  """Returns the config (paper defaults; see ../shared/METHODS.md)."""
  del arg
  return default.with_rule("weight_average")
