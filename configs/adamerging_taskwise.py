r"""AdaMerging task-wise: one Λ per task vector.

python launch/learn_merge.py --config=configs/adamerging_taskwise.py:runlocal --workdir=/tmp/ada_tw
"""

import ml_collections

from configs import adamerging


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """Returns the config; `arg == "runlocal"` shrinks it for a smoke run."""
  config = adamerging.get_config(arg)
  config.coefficients.granularity = "task"
  return config
