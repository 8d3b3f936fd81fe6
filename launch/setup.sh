#!/usr/bin/env bash
# launch/setup.sh [EXTRAS]: makes .venv (Python >= 3.11) and installs mergejax with EXTRAS
# (e.g. "test,hf,notebooks") under launch/constraints.txt. Idempotent: a second run only checks
# what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "${PYTHON}" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
if [ -n "${1:-}" ]; then
  .venv/bin/python -m pip install -q -c launch/constraints.txt -e ".[${1}]"
else
  .venv/bin/python -m pip install -q -c launch/constraints.txt -e .
fi
