r"""Task arithmetic: θ = θ0 + λ Σ τt (choose λ on validation).

  python launch/merge.py --config=configs/task_arithmetic.py \
      --config.base=BASE --config.experts=E1,E2,... --workdir=/tmp/task_arithmetic
"""

from configs import default


def get_config(arg: str = ""):
  """Returns the config (paper defaults; see ../shared/METHODS.md)."""
  del arg
  return default.with_rule("task_arithmetic", scale=0.3)
