#!/usr/bin/env bash
# launch/main.sh [FLAGS]: sets everything up, then runs the main job: the built-in offline
# benchmark (synthvision: zoo, regime checks, every data-free and learned merging method with its
# hyper-parameters chosen on validation, 3 seeds, table + plots).
# Results land in ${WORKDIR:-results/benchmark}; extra flags pass through to launch/benchmark.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
.venv/bin/python launch/benchmark.py --config=configs/benchmark.py \
  --workdir="${WORKDIR:-results/benchmark}" "$@"
