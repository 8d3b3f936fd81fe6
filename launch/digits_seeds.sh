#!/usr/bin/env bash
# launch/digits_seeds.sh [SEEDS...] [-- FLAGS]: the digits stress test once per seed (default
# 0 1 2), then one table of mean ± std over the seeds (seeds.md). (The main job,
# configs/benchmark.py, runs its seeds in one process.) A seed changes the whole zoo
# (pre-training, fine-tuning, multi-task model) and the learned methods' batch order, so the
# spread covers data-free and learned rows alike. Results land in
# ${WORKDIR:-results/digits_seeds}/seed_<s>/ and ${WORKDIR}/seeds.md; flags after -- pass through
# to launch/benchmark.py (e.g. -- --config.learned.enabled=false).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
workdir="${WORKDIR:-results/digits_seeds}"
seeds=()
while [[ $# -gt 0 && "$1" != "--" ]]; do seeds+=("$1"); shift; done
[[ $# -gt 0 ]] && shift  # Drop the "--".
[[ ${#seeds[@]} -eq 0 ]] && seeds=(0 1 2)
dirs=()
for seed in "${seeds[@]}"; do
  .venv/bin/python launch/benchmark.py --config=configs/digits.py --config.seed="${seed}" \
    --workdir="${workdir}/seed_${seed}" "$@"
  dirs+=("${workdir}/seed_${seed}")
done
.venv/bin/python -c 'import sys; from mergejax.benchmarks.digits import run as benchmark
benchmark.write_seeds_summary(sys.argv[1], sys.argv[2:])' "${workdir}" "${dirs[@]}"
