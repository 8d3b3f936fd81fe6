r"""AdaMerging task-wise: one Λ per task vector.

  python launch/learn_merge.py --config=configs/learned/adamerging_taskwise.py:runlocal \
      --workdir=/tmp/ada_tw
"""

import ml_collections

from configs.learned import adamerging


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """Returns the config; `arg == "runlocal"` shrinks it for a smoke run."""
  config = adamerging.get_config(arg)
  config.label = "AdaMerging task-wise"
  config.table_rank = 10
  config.coefficients.granularity = "task"
  return config
