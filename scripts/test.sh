#!/usr/bin/env bash
# The test command: install what is needed, lint, build the documentation site, run the whole suite.
# Arguments go to pytest (e.g. `bash scripts/test.sh tests/layers -x`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks examples
# broken links, missing pages and docstrings the API reference cannot parse fail here (site/ is git-ignored)
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --site-dir site
.venv/bin/python -m pytest -q "$@"
