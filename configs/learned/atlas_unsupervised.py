r"""aTLAS unsupervised (UFM, `learn_ufm.py` in fredzzhang/atlas) on unlabeled test inputs.

Targets from a weak view (trusted examples: each class's top-k by the initial model's confidence,
labeled with its argmax; other examples: the weak view's softmax), cross-entropy on a strong view,
counted where the target's confidence exceeds 0.99, divided by the number counted. The problem
supplies the views (`LearnProblem.augment`). Transductive, as the reference: it adapts on the
unlabeled test split (`--config.adapt_split=train` adapts on training inputs instead). The best
epoch is chosen by validation entropy (no labels used anywhere; the reference picks by labeled
validation accuracy).
`--config.objective.trusted=all` runs the reference script as it executes (every example trusted).
The former same-view loss is objective dict(name="pseudo_label", threshold=0.99).

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
  config.adapt_split = "test"
  config.objective = dict(
    name="ufm", threshold=0.99, trusted="top_k", trusted_fraction=0.1, max_trusted_per_class=100
  )
  config.early_stopping.metric = "neg_entropy"
  return config
