r"""The synthvision zoo and its regime checks; the work lives in
`mergejax.benchmarks.synthvision.run.run`.

python launch/synthvision.py --config=configs/synthvision.py --workdir=/tmp/synthvision
python launch/synthvision.py --config=configs/synthvision.py:smoke --workdir=/tmp/sv_smoke
"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from mergejax.benchmarks.synthvision import run

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Path to configs/synthvision.py (optionally :smoke, :wide, :vit).",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory for regime.json / regime.md.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  logging.info("JAX devices: %s", jax.devices())
  run.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
