"""launch/learn_merge.py: learned merging (AdaMerging, aTLAS, DV-BASI) on the synthetic problem.
The work lives in mergejax.benchmarks.synthetic_run.

  python launch/learn_merge.py --config=configs/learned/adamerging.py:runlocal \
      --workdir=/tmp/adamerging

θ0 and the basis are split over `--config.mesh.model` devices, batches over `--config.mesh.data`
(default: every device); several hosts run the same command with `--config.distributed.*`.
"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from mergejax.benchmarks import synthetic_run
from mergejax.distributed import hosts

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Path to a configs/learned/*.py recipe.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output (and resume) directory.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  hosts.initialize(_CONFIG.value.get("distributed"))  # Before any other JAX call.
  logging.info("JAX devices: %s", jax.devices())
  synthetic_run.learn_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
