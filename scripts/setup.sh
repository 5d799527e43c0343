#!/usr/bin/env bash
# Create .venv (once) and install biformer with its test and documentation tools. Sourced by the other scripts.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test,docs]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import biformer, timm, torch" # fail early if the install did not work
