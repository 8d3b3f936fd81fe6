r"""aTLAS supervised (Zhang et al., NeurIPS 2024): layer-wise Λ from 0, cross-entropy on validation.

AdamW lr 1e-3, weight decay 0.1, gradient-norm clip 1.0, 20 epochs of the tasks in lockstep over
the smallest one, one batch of 16 per task and step; the epoch with the best validation (normalized)
accuracy is kept. Not transductive.

  python launch/learn_merge.py --config=configs/learned/atlas.py:runlocal --workdir=/tmp/atlas
"""

import ml_collections

from configs.learned import adamerging


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """Returns the config; `arg == "runlocal"` shrinks it for a smoke run."""
  runlocal = arg == "runlocal"
  config = adamerging.get_config(arg)
  config.label = "aTLAS (supervised)"
  config.table_rank = 40
  config.adapt_split = "validation"
  config.coefficients.init = 0.0
  config.coefficients.clamp = ()
  config.objective = dict(name="cross_entropy")
  config.optim = dict(name="adamw", learning_rate=1e-3, weight_decay=0.1, clip_norm=1.0)
  config.train.batches_per_step = 1
  config.train.epochs = 2 if runlocal else 20
  config.train.eval_every = 0  # Once per epoch.
  return config
