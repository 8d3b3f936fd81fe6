r"""DELLA-Merging: MagPrune (keep p in density ± ε by rank within a row), elect, fuse.

  python launch/merge.py --config=configs/della.py \
      --config.base=BASE --config.experts=E1,E2,... --workdir=/tmp/della
"""

from configs import default


def get_config(arg: str = ""):
  """Returns the config (paper defaults; see ../shared/METHODS.md)."""
  del arg
  return default.with_rule(
    "della", density=0.3, epsilon=0.1, scale=1.0, scope="row", combine="ties"
  )
