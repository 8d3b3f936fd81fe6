r"""Model Breadcrumbs at the reference search's seed point (density 0.15, γ 0.006, α 0.2).

  python launch/merge.py --config=configs/breadcrumbs.py \
      --config.base=BASE --config.experts=E1,E2,... --workdir=/tmp/breadcrumbs
"""

from configs import default


def get_config(arg: str = ""):
  """Returns the config (paper defaults; see ../shared/METHODS.md)."""
  del arg
  return default.with_rule(
    "breadcrumbs", density=0.15, gamma=0.006, scale=0.2, scope="leaf", combine="sum"
  )
