"""parallel.reduce on 2 real ranks: batched collectives give the per-tensor results, uneven and
empty shards gather back whole."""

from __future__ import annotations

import pytest
import torch

from harness import run_ranks

pytestmark = pytest.mark.distributed


def _reduce_checks() -> dict:
    import torch.distributed as dist

    import nvfp4_dist.parallel.reduce as reduce
    from nvfp4_dist.launch import init_distributed

    device = init_distributed(timeout_s=60).device
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(rank)
    tensors = [torch.randn(n, generator=gen).to(device) for n in (5, 300, 1, 17, 64)]
    expected = [t.clone() for t in tensors]
    for t in expected:
        dist.all_reduce(t)
    reduce._BUCKET_ELEMS = 100  # several buckets, and tensors larger than a bucket
    batched = [t.clone() for t in tensors]
    reduce._batched_all_reduce(batched, dist.ReduceOp.SUM, dist.group.WORLD)
    same_sums = all(torch.equal(a, b) for a, b in zip(batched, expected))
    # Uneven rows (FSDP2's chunking of 5 rows over 2 ranks: 3 + 2), then an empty shard.
    full = torch.arange(5 * 32, dtype=torch.float32, device=device).reshape(5, 32)
    mine = full[:3] if rank == 0 else full[3:]
    gathered = reduce.gather_along(mine, 0, 0 if rank == 0 else 3, dist.group.WORLD)
    cols = reduce.gather_along(full[:, :16] if rank == 0 else full[:, 16:], 1, 16 * rank,
                               dist.group.WORLD, dst=1)
    empty = reduce.gather_along(full if rank == 0 else full[5:], 0, 0 if rank == 0 else 5, dist.group.WORLD)
    fp8 = reduce.gather_along(mine.to(torch.float8_e4m3fn), 0, 0 if rank == 0 else 3, dist.group.WORLD)
    return dict(same_sums=same_sums, rows=torch.equal(gathered, full),
                cols=(cols is None) if rank == 0 else torch.equal(cols, full),
                empty=torch.equal(empty, full),
                fp8=torch.equal(fp8.view(torch.uint8), full.to(torch.float8_e4m3fn).view(torch.uint8)))


def test_batched_reduce_and_uneven_gathers():
    for result in run_ranks(_reduce_checks, 2):
        assert result == dict(same_sums=True, rows=True, cols=True, empty=True, fp8=True)
