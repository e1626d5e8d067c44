#!/usr/bin/env bash
# The prepared GPU run (see benchmarks/gpu.py): bash benchmarks/gpu.sh [--dry-run] [--skip ...]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/gpu.py "$@"
