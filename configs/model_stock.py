r"""Model Stock: per leaf, θ = θ0 + t · mean τ with t from the task vectors' angle.

  python launch/merge.py --config=configs/model_stock.py \
      --config.base=BASE --config.experts=E1,E2,... --workdir=/tmp/model_stock
"""

from configs import default


def get_config(arg: str = ""):
  """Returns the config (paper defaults; see ../shared/METHODS.md)."""
  del arg
  return default.with_rule("model_stock")
