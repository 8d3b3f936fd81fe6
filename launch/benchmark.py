r"""The built-in offline benchmarks; the work lives in `mergejax.benchmarks.<name>.run`.

python launch/benchmark.py --config=configs/benchmark.py --workdir=results/benchmark  # main job
python launch/benchmark.py --config=configs/benchmark.py:smoke --workdir=/tmp/bench_smoke
python launch/benchmark.py --config=configs/digits.py --workdir=/tmp/digits  # stress test

The config's `benchmark` field names the runner: "synthvision" (configs/benchmark.py) or
"digits" (configs/digits.py).
"""

import importlib

import jax
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "configs/benchmark.py or configs/digits.py (with :switches).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory for results and plots.")
RUNNERS = ("synthvision", "digits")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  name = _CONFIG.value.benchmark
  if name not in RUNNERS:
    raise app.UsageError(f"Unknown benchmark {name!r}; known: {RUNNERS}.")
  logging.info("JAX devices: %s", jax.devices())
  runner = importlib.import_module(f"mergejax.benchmarks.{name}.run")
  runner.run_benchmark(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
