r"""Task negation (forgetting): θ = θ0 − λ Σ τt.

  python launch/merge.py --config=configs/task_negation.py \
      --config.base=BASE --config.experts=E1,E2,... --workdir=/tmp/task_negation
"""

from configs import default


def get_config(arg: str = ""):
  """Returns the config (paper defaults; see ../shared/METHODS.md)."""
  del arg
  return default.with_rule("task_negation", scale=1.0)
