#!/usr/bin/env bash
# The test command: install what is needed, lint, run the whole suite.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks examples
.venv/bin/python -m pytest -q "$@"
