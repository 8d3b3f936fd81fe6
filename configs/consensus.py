r"""Consensus task arithmetic: TALL masks (λt = 0.4), keep entries chosen by ≥ 2 tasks.

  python launch/merge.py --config=configs/consensus.py \
      --config.base=BASE --config.experts=E1,E2,... --workdir=/tmp/consensus
"""

from configs import default


def get_config(arg: str = ""):
  """Returns the config (paper defaults; see ../shared/METHODS.md)."""
  del arg
  return default.with_rule("consensus", tall_lambda=0.4, min_tasks=2, scale=0.3, combine="sum")
