#!/usr/bin/env bash
# The prepared GPU check (see benchmarks/gpu_check.py): OS-Fed factor 4, ResNet-18-GN, 224/336/448 px,
# bf16 + channels-last, 2 rounds; per-client peak GPU memory and seconds next to the paper's Table 10.
# On a machine with one GPU: `benchmarks/gpu_check.sh` (sets up .venv like `make install` if needed).
set -euo pipefail
cd "$(dirname "$0")/.."
make install >/dev/null
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
exec .venv/bin/python benchmarks/gpu_check.py "$@"
