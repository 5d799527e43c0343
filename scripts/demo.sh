#!/usr/bin/env bash
# The quick start's main job: install, then classify an image with BiFormer-T.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
.venv/bin/python examples/classify.py "$@"
