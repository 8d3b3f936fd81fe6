r"""The built-in offline benchmark; the work lives in `mergejax.benchmark.run_benchmark`.

python launch/benchmark.py --config=configs/benchmark.py --workdir=/tmp/mergejax_bench
python launch/benchmark.py --config=configs/benchmark.py:smoke --workdir=/tmp/bench_smoke
"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from mergejax.benchmarks.digits import run as benchmark

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Path to configs/benchmark.py (optionally :smoke or :vit).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory for results and plots.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  logging.info("JAX devices: %s", jax.devices())
  benchmark.run_benchmark(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
