"""Multi-process harness for the distributed tests: real torch.distributed, one process per rank.

Backend: pytest's ``--dist-backend`` option (tests/conftest.py passes it to :func:`choose_backend`).
``gloo`` (the default): every rank on the CPU, on any machine; the workers are started with
``CUDA_VISIBLE_DEVICES=""``, so on a GPU machine they run exactly as on CI. ``nccl``: one GPU
per rank (``cuda:LOCAL_RANK``, chosen by ``init_distributed``), no patches; a test needing more
ranks than there are GPUs is skipped (NCCL cannot put two ranks on one GPU). On the CPU, workers
come from a forkserver that imports torch, transformers and megatron-core once, so each test pays
the import cost once instead of once per rank; with NCCL they are spawned (a forked child cannot
use CUDA once its parent initialised it).

CPU-only obstacles of megatron-core are patched HERE, in the workers of a machine without CUDA,
never in the library: see :func:`patch_megatron_for_cpu`.
"""

from __future__ import annotations

import contextlib
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


BACKENDS = ("gloo", "nccl")
_CHOSEN = {"backend": "gloo"}  # set from pytest's --dist-backend by tests/conftest.py


def choose_backend(backend: str) -> None:
    """The transport of every test's ranks: "gloo" (CPU workers) or "nccl" (a GPU per rank)."""
    if backend not in BACKENDS:
        raise ValueError(f"--dist-backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    _CHOSEN["backend"] = backend


def backend_for(world_size: int) -> str:
    """"gloo" (default), or with ``--dist-backend nccl`` "nccl" when there are >= world_size
    GPUs; skips otherwise."""
    if _CHOSEN["backend"] == "gloo":
        return "gloo"
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus >= world_size:
        return "nccl"
    pytest.skip(f"--dist-backend nccl: needs {world_size} GPUs (have {gpus}); the default "
                "--dist-backend gloo runs it on the CPU")


@contextlib.contextmanager
def cpu_only_children():
    """Processes started inside see no GPU (``CUDA_VISIBLE_DEVICES=""``), so gloo ranks on a GPU
    machine choose the CPU as on CI (the parent's own CUDA is initialised already: unaffected)."""
    old = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        if old is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = old


def patch_megatron_for_cpu() -> None:
    """Let megatron-core's GPT forward run without CUDA (test workers on CPU-only machines).

    megatron-core 0.16 RotaryEmbedding.get_emb moves ``inv_freq`` to
    ``torch.cuda.current_device()`` on the first forward; answering the CPU device keeps it
    where it is. (The library itself avoids the other CUDA-only paths: it passes an explicit
    causal mask and uses Megatron's inference RNG tracker.)
    """
    if not torch.cuda.is_available():
        torch.cuda.current_device = lambda: torch.device("cpu")


def patch_megatron_schedule_for_cpu() -> None:
    """megatron-core's schedules allocate their token counter with ``device="cuda"``: on a machine
    without CUDA the schedule module gets a ``torch`` whose ``zeros`` puts it on the CPU (test
    workers only, never the library)."""
    if torch.cuda.is_available():
        return
    from megatron.core.pipeline_parallel import schedules

    class _CpuTorch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def zeros(*args, device=None, **kwargs):
            return torch.zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)

    schedules.torch = _CpuTorch()


def patch_megatron_pipeline_for_cpu() -> None:
    """Let megatron-core's pipeline schedule (and a last stage's tied embedding copy) run without
    CUDA, on gloo: test workers of CPU-only machines only, never the library. What 0.16 needs:

    * ``schedules.py`` allocates its token counter with ``torch.zeros(..., device="cuda")`` (every
      schedule): the schedule module's ``torch`` gets a ``zeros`` that puts it on the CPU;
    * ``p2p_communication.py`` calls ``torch.cuda.synchronize()`` after each batched
      isend/irecv (``batch_p2p_sync``): a no-op here (gloo's requests are waited on before);
    * ``LanguageModule.setup_embeddings_and_output_layer`` moves the tied embedding weight with
      ``weight.data.cuda()`` before all-reducing it over the embedding group (first and last
      stage): ``Tensor.cuda`` returns the tensor itself.
    The p2p buffers themselves are allocated on ``torch.cuda.current_device()``, which
    :func:`patch_megatron_for_cpu` answers with the CPU; gloo carries the sends and receives.
    """
    if torch.cuda.is_available():
        return
    patch_megatron_schedule_for_cpu()
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


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
        with cpu_only_children() if backend == "gloo" else contextlib.nullcontext():
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
