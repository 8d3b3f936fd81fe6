#!/usr/bin/env bash
# launch/test.sh [PYTEST ARGS]: sets everything up, then runs the linter and the whole test suite
# (notebooks included). This is the README's test command and what CI runs. The test files run in
# parallel worker processes (pytest-xdist), a file to a worker so its module fixtures run once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh "test,hf,notebooks"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # Parity tests build their models locally.
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q -m "not gpu" --nbmake -n auto --maxprocesses=4 --dist loadfile \
  tests/ notebooks/ "$@"
