"""transformers fused experts under FSDP2 (real torch.distributed, gloo, two processes)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))

from harness import run_ranks  # noqa: E402

pytestmark = pytest.mark.distributed


def _fsdp2_experts_refused() -> str:
    from nvfp4_dist import QuantConfig, quantize
    from nvfp4_dist.errors import LayoutError
    from nvfp4_dist.launch import init_distributed, shard_fsdp2

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from moe_testutil import forward_loop, small_moe, tokens

    init_distributed(timeout_s=60)
    model = shard_fsdp2(small_moe())
    try:
        quantize(model, QuantConfig(method="max"), forward_loop(tokens(2, 8)), show_progress=False)
    except LayoutError as exc:
        return str(exc)
    return "no error"


def test_fsdp2_sharded_fused_experts_are_refused_with_the_alternatives():
    messages = run_ranks(_fsdp2_experts_refused, 2)
    for message in messages:
        assert "model.layers.0.mlp.experts: fused experts sharded as DTensors" in message
        assert "--backend megatron --ep N" in message
