"""A rank that raises or dies makes the others fail with a clear error within a bounded time.

Rank 1 breaks during the calibration forward while rank 0 goes on into the statistics reduce.
The process-group timeout is an explicit option (5 s here, ``init_distributed(timeout_s=...)``
and ``--dist-timeout`` on the CLI); rank 0 must raise DistributedError naming the cause, long
before the harness's own limit.
"""

from __future__ import annotations

import os
import time

import pytest

from harness import backend_for, run_ranks
from small_model import small_tokens

pytestmark = pytest.mark.distributed

TIMEOUT_S = 5.0
# Generous bound on rank 0's wait: the timeout plus process start-up jitter on a loaded machine.
BOUND_S = 60.0


def _break_rank_one(mode: str):
    """Worker: rank 1 raises (staying alive: only the timeout can free rank 0) or dies (os._exit)
    in its forward loop; rank 0 calibrates normally. Returns rank 0's outcome."""
    import torch.distributed as dist

    from small_model import small_hf_model

    from nvfp4_dist import QuantConfig, quantize
    from nvfp4_dist.errors import DistributedError
    from nvfp4_dist.launch import collective_failures, init_distributed

    init_distributed(timeout_s=TIMEOUT_S)
    rank = dist.get_rank()
    tokens = small_tokens()

    def loop(model):
        if rank == 1:
            if mode == "die":
                os._exit(3)
            raise ValueError("rank 1: corrupt calibration batch")
        model(tokens)

    start = time.monotonic()
    try:
        with collective_failures(TIMEOUT_S):
            quantize(small_hf_model(), QuantConfig(method="local_hessian"), loop, show_progress=False)
    except DistributedError as exc:
        return dict(kind="DistributedError", message=str(exc), seconds=time.monotonic() - start)
    except ValueError as exc:
        time.sleep(2 * TIMEOUT_S)  # stay alive with the process group open
        return dict(kind="ValueError", message=str(exc), seconds=time.monotonic() - start)
    return dict(kind="finished", message="", seconds=time.monotonic() - start)


@pytest.mark.parametrize("mode", ["raise", "die"])
def test_other_ranks_fail_fast_and_clearly(mode):
    nccl = backend_for(2) == "nccl"
    start = time.monotonic()
    # NCCL: the watchdog aborts a timed-out rank (its log names the collective), so rank 0 may
    # end without a result; gloo raises in the collective, which the library turns into
    # DistributedError.
    results = run_ranks(_break_rank_one, 2, mode, timeout_s=240, may_die=(0, 1) if nccl else (1,))
    assert time.monotonic() - start < BOUND_S + 60  # start-up of both ranks included
    rank0 = results[0]
    if nccl and rank0 is None:
        return
    assert rank0["kind"] == "DistributedError", rank0
    assert rank0["seconds"] < BOUND_S
    assert "rank 0: a collective failed" in rank0["message"]
    assert "Another rank most likely raised or died" in rank0["message"]
    if mode == "raise":
        assert results[1]["kind"] == "ValueError"
    else:
        assert results[1] is None
