#!/usr/bin/env bash
# Install nvfp4_dist (editable) into the active Python environment.
#   bash scripts/install.sh            # the package
#   bash scripts/install.sh test       # plus the test extra (pytest, compressed-tensors, megatron-core)
# torch: an existing installation is kept (GPU users keep their CUDA build). Only where no torch
# is importable does this install torch==2.13.0 first; on machines that carry a local CPU build
# of 2.13.0 that is a seconds-long install, elsewhere it is pip's default build for the platform.
#   bash scripts/install.sh test transformers==5.17.0   # extra requirements resolved with it
#                                                        # (CI: the lowest supported transformers)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
shift || true
pins=("$@")
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install -q "torch==2.13.0"
fi
if [ -n "$extras" ]; then
  python -m pip install -q -e ".[${extras}]" "${pins[@]}"
else
  python -m pip install -q -e . "${pins[@]}"
fi
