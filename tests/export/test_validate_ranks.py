"""Under two ranks, an invalid module written by rank 1 reaches rank 0 before publish: both
ranks raise the same one-line ExportError naming it, and nothing is published or left behind."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))  # harness, small_model

from harness import run_ranks  # noqa: E402
from small_model import small_hf_model  # noqa: E402

pytestmark = pytest.mark.distributed


def _rank_one_writes_nan(root: str) -> str:
    import torch
    import torch.distributed as dist

    import nvfp4_dist.export.pieces as pieces
    from nvfp4_dist import QuantConfig, quantize
    from nvfp4_dist.errors import ExportError
    from nvfp4_dist.export import export_checkpoint
    from nvfp4_dist.launch import init_distributed

    init_distributed(timeout_s=60)
    model = small_hf_model()  # every rank the whole model: writers rotate over the ranks
    result = quantize(model, QuantConfig(method="max", quantize_inputs=False), show_progress=False)
    if dist.get_rank() == 1:
        real = pieces.build_tensors

        def poisoned(fmt, name, packed, scale, *args):
            out = real(fmt, name, packed, scale, *args)
            out[f"{name}.weight_scale"] = torch.full_like(scale.float(), float("nan")).to(scale.dtype)
            return out

        pieces.build_tensors = poisoned
    try:
        export_checkpoint(model, result, f"{root}/out")
    except ExportError as exc:
        return str(exc)
    return "published"


def test_a_rank_s_invalid_module_stops_the_publish_on_every_rank(tmp_path):
    messages = run_ranks(_rank_one_writes_nan, 2, str(tmp_path))
    assert messages[0] == messages[1], messages
    assert "failed validation, nothing was published" in messages[0] and "\n" not in messages[0]
    assert "non-finite FP8 block scales" in messages[0]
    assert list(tmp_path.iterdir()) == []
