"""The distributed harness and the small HF model live in tests/distributed."""

import sys
from pathlib import Path

_DISTRIBUTED = str(Path(__file__).resolve().parents[1] / "distributed")
if _DISTRIBUTED not in sys.path:
    sys.path.insert(0, _DISTRIBUTED)
