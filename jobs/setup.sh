#!/usr/bin/env bash
# Idempotent local setup: a virtual environment in .venv with raysemi and its dependencies.
# The CPU torch wheel is installed first, so the `torch` requirement of raysemi is already met and
# pip does not pull a multi-GB CUDA build. On a GPU machine, install the CUDA torch you want
# into the environment first (or set RAYSEMI_TORCH="torch==2.13.0" to any spec).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.raysemi-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "${RAYSEMI_TORCH:-torch==2.13.0}"
  .venv/bin/python -m pip install -q -e '.[dev]'
  touch "$stamp"
fi
