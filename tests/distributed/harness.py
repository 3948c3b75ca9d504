"""Multi-process harness for the distributed tests: real torch.distributed, one process per rank.

Backend: NCCL with one GPU per rank when CUDA has enough GPUs, gloo on the CPU when there is no
CUDA at all; with CUDA but too few GPUs the test is skipped (NCCL cannot put two ranks on one
GPU). On the CPU, workers come from a forkserver that imports torch, transformers and
megatron-core once, so each test pays the import cost once instead of once per rank; with CUDA
they are spawned (a forked child cannot use CUDA once its parent initialised it).

CPU-only obstacles of megatron-core are patched HERE, in the workers of a machine without CUDA,
never in the library: see :func:`patch_megatron_for_cpu`.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp

_PRELOAD = ["torch", "torch.distributed", "transformers", "nvfp4_dist", "nvfp4_dist.launch",
            "megatron.core.models.gpt", "megatron.core.tensor_parallel"]


def backend_for(world_size: int) -> str:
    """"nccl" with >= world_size GPUs, "gloo" without CUDA; skips otherwise."""
    if not torch.cuda.is_available():
        return "gloo"
    if torch.cuda.device_count() >= world_size:
        return "nccl"
    pytest.skip(f"needs {world_size} GPUs for NCCL (have {torch.cuda.device_count()}); "
                "runs on gloo on a machine without CUDA")


def patch_megatron_for_cpu() -> None:
    """Let megatron-core's GPT forward run without CUDA (test workers on CPU-only machines).

    megatron-core 0.16 RotaryEmbedding.get_emb moves ``inv_freq`` to
    ``torch.cuda.current_device()`` on the first forward; answering the CPU device keeps it
    where it is. (The library itself avoids the other CUDA-only paths: it passes an explicit
    causal mask and uses Megatron's inference RNG tracker.)
    """
    if not torch.cuda.is_available():
        torch.cuda.current_device = lambda: torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world_size: int, port: int, out_dir: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)  # several ranks share the CI machine's cores
    patch_megatron_for_cpu()
    try:
        result = fn(*args)
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        from nvfp4_dist.launch import shutdown

        try:
            shutdown()
        except Exception:  # a broken process group (failure tests) cannot always be left cleanly
            traceback.print_exc()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


class _PortTaken(Exception):
    """The rendezvous port was taken between choosing it and binding it (another process)."""


def run_ranks(fn, world_size: int, *args, timeout_s: float = 300.0, may_die: tuple[int, ...] = ()) -> list:
    """See :func:`_run_ranks`; retried (up to 3 times) when the rendezvous port was taken."""
    for attempt in range(3):
        try:
            return _run_ranks(fn, world_size, *args, timeout_s=timeout_s, may_die=may_die)
        except _PortTaken:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _run_ranks(fn, world_size: int, *args, timeout_s: float = 300.0, may_die: tuple[int, ...] = ()) -> list:
    """Run ``fn(*args)`` on ``world_size`` ranks (env set as torchrun would); returns each rank's
    return value (tensors, dicts, lists, strings, numbers) in rank order, None for a rank in
    ``may_die`` that exited without one. ``fn`` joins the process group itself
    (``nvfp4_dist.launch.init_distributed``). Any other rank that fails fails the test with its
    traceback; ranks still running after ``timeout_s`` are killed and fail it too."""
    backend = backend_for(world_size)
    if backend == "nccl":  # a forkserver that imported CUDA-touching modules cannot fork CUDA users
        ctx = mp.get_context("spawn")
    else:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
    out_dir = tempfile.mkdtemp(prefix="nvfp4_dist_ranks_")
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, fn, world_size, port, out_dir, args), daemon=True)
             for r in range(world_size)]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        while any(p.is_alive() for p in procs):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers still running after {timeout_s:g} s")
            time.sleep(0.2)
        results = []
        for r, p in enumerate(procs):
            path = os.path.join(out_dir, f"rank{r}.pt")
            if p.exitcode == 0 and os.path.exists(path):
                results.append(torch.load(path, weights_only=True))
            elif r in may_die:
                results.append(None)
            else:
                err = os.path.join(out_dir, f"rank{r}.err")
                detail = open(err).read() if os.path.exists(err) else "(no traceback)"
                if "EADDRINUSE" in detail:
                    raise _PortTaken(detail)
                pytest.fail(f"rank {r} exited with code {p.exitcode}:\n{detail}")
        return results
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        shutil.rmtree(out_dir, ignore_errors=True)
