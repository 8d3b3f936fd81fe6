r"""AdaMerging++ layer-wise: AdaMerging over TIES-trimmed task vectors (top 20% of |τ| kept).

python launch/learn_merge.py --config=configs/adamerging_plus.py:runlocal --workdir=/tmp/ada_pp
"""

import ml_collections

from configs import adamerging


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """Returns the config; `arg == "runlocal"` shrinks it for a smoke run."""
  config = adamerging.get_config(arg)
  config.method = "adamerging_plus"
  config.basis.name = "ties_trimmed"
  return config
