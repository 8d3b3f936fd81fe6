r"""aTLAS unsupervised: pseudo-labels (confidence >= 0.99) on unlabeled train inputs.

The best epoch is chosen by validation entropy (no labels used anywhere). Not transductive.

  python launch/learn_merge.py --config=configs/learned/atlas_unsupervised.py:runlocal \
      --workdir=/tmp/atlas_u
"""

import ml_collections

from configs.learned import atlas


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """Returns the config; `arg == "runlocal"` shrinks it for a smoke run."""
  config = atlas.get_config(arg)
  config.label = "aTLAS (unsupervised)"
  config.table_rank = 50
  config.adapt_split = "train"
  config.objective = dict(name="pseudo_label", threshold=0.99)
  config.early_stopping.metric = "neg_entropy"
  return config
