#!/usr/bin/env bash
# The quick start's main job: install, get Fashion-MNIST, train BiFormer-Nano on it with `biformer train`.
# Arguments are passed to `biformer train` (e.g. --epochs 2, or --dataset imagefolder --data-dir DATA).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  # Debian/Ubuntu ship Fashion-MNIST as a package (30 MB, MIT); elsewhere `biformer train` downloads it.
  SUDO=""
  if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
  { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist; } \
    || echo "demo.sh: could not install dataset-fashion-mnist; biformer train will try to download it"
fi
.venv/bin/biformer train "$@"
