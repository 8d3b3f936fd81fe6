r"""DV-BASI unsupervised: entropy on unlabeled test inputs (transductive), starting from AdaMerging.

θ^(0) = layer-wise AdaMerging (config.start); the objective is entropy on test inputs; early
stopping and the choice of iteration use validation entropy (labels unused, test never used for
selection).

  python launch/learn_merge.py --config=configs/learned/dv_basi_unsupervised.py:runlocal \
      --workdir=/tmp/dvu
"""

import ml_collections

from configs.learned import adamerging, dv_basi


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """Returns the config; `arg == "runlocal"` shrinks it for a smoke run."""
  config = dv_basi.get_config(arg)
  config.label = "DV-BASI (unsupervised)"
  config.table_rank = 70
  config.start = adamerging.get_config(arg)
  config.adapt_split = "test"
  config.objective = dict(name="entropy")
  config.early_stopping.metric = "neg_entropy"
  return config
