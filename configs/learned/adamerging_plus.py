r"""AdaMerging++ layer-wise: AdaMerging over TIES-processed task vectors.

The basis is AdaMerging's `ties_merging_split`: each flattened τt trimmed to its top 20%, the sign
elected over all tasks, and in each trimmed τt only the entries that agree with it kept.

  python launch/learn_merge.py --config=configs/learned/adamerging_plus.py:runlocal \
      --workdir=/tmp/ada_pp
"""

import ml_collections

from configs.learned import adamerging


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """Returns the config; `arg == "runlocal"` shrinks it for a smoke run."""
  config = adamerging.get_config(arg)
  config.label = "AdaMerging++ layer-wise"
  config.table_rank = 30
  config.basis.name = "ties_split"
  return config
