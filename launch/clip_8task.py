r"""Merges CLIP image encoders with any rule and evaluates them on the 8-task benchmark.

  python launch/clip_8task.py --config=configs/clip_8task.py:rule=ties \
      --config.pool.pretrained=/ckpt/clip-vit-base-patch32 \
      --config.pool.experts_dir=/ckpt/clip-vit-base-patch32_{task} \
      --config.data.root_dir=/data/{task} --workdir=/tmp/clip8_ties

Writes workdir/results.md, results.json and merged/ (see mergejax/benchmarks/clip8/).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from mergejax.benchmarks.clip8 import run as clip8_run

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Path to configs/clip_8task.py[:rule=<name>,...].", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  record = clip8_run.merge_and_evaluate(_CONFIG.value, _WORKDIR.value)
  logging.info("Done in %.1f s.", record["wall_time_s"])
  print(record["table"])


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
