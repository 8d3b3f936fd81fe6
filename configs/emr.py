r"""EMR-Merging: unified vector + per-task masks and rescalers; writes one model per task.

  python launch/merge.py --config=configs/emr.py \
      --config.base=BASE --config.experts=E1,E2,... --workdir=/tmp/emr
"""

from configs import default


def get_config(arg: str = ""):
  """Returns the config (paper defaults; see ../shared/METHODS.md)."""
  del arg
  return default.with_rule("emr")
