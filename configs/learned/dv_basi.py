r"""DV-BASI supervised (Wang et al., AAAI 2026), starting from aTLAS.

θ^(0) = the aTLAS merge (config.start). Outer iterations m = 1..3: δ = θ^(m−1) − θ0, block-wise
(layer-wise) Λ from 0.1, AdamW lr 0.01 (weight decay 0.1 pulls Λ back to the current iterate), up to
60 epochs with early stopping (patience 5) on validation accuracy; Λ and the optimizer state reset
each iteration; the iteration best on validation is returned (never chosen on test).
Set config.train.mgda=True for the MGDA variant.

  python launch/learn_merge.py --config=configs/learned/dv_basi.py:runlocal --workdir=/tmp/dv_basi
"""

import ml_collections

from configs.learned import atlas


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """Returns the config; `arg == "runlocal"` shrinks it for a smoke run."""
  runlocal = arg == "runlocal"
  config = atlas.get_config(arg)
  config.label = "DV-BASI (supervised)"
  config.table_rank = 60
  config.start = atlas.get_config(arg)  # Recipe for θ^(0) (dv_basi.start == "learned").
  config.method = "dv_basi"
  config.dv_basi.outer_iterations = 2 if runlocal else 3
  config.coefficients.init = 0.1
  config.optim.learning_rate = 0.01
  config.train.epochs = 3 if runlocal else 60
  config.early_stopping.patience = 5
  return config
