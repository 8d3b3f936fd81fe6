r"""Any sparsifier, then any combiner (here: TIES trim at 20%, then a plain sum).

  python launch/merge.py --config=configs/sparsify_combine.py \
      --config.base=BASE --config.experts=E1,E2,... --workdir=/tmp/sparsify_combine
"""

from configs import default


def get_config(arg: str = ""):
  """Returns the config (paper defaults; see ../shared/METHODS.md)."""
  del arg
  return default.with_rule(
    "sparsify_combine",
    sparsifier="ties_trim",
    combine="sum",
    density=0.2,
    gamma=0.006,
    epsilon=0.1,
    scale=1.0,
  )
