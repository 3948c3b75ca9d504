"""Distributed launch: join torchrun's process group and lay a model out for calibration.

    info = init_distributed(timeout_s=600)          # gloo on CPU, NCCL with one GPU per rank
    ctx = init_megatron(tp=2)                       # Megatron parallel_state, TP=2, DP=rest
    ctx = init_megatron(tp=2, pp=2)                 # ... and two pipeline stages
    model = shard_fsdp2(hf_model)                   # or: FSDP2 over all ranks

Every collective runs under the process-group timeout given here (an explicit option, also
``--dist-timeout`` on the CLI), so a rank that raises or dies makes the others fail within that
bound instead of hanging: gloo raises on timeout or on a closed peer connection, NCCL's watchdog
aborts the communicator. :func:`collective_failures` turns those errors into a
:class:`~nvfp4_dist.errors.DistributedError` that says what happened and where to look.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError, DistributedError
from .parallel.context import ParallelContext

DEFAULT_TIMEOUT_S = 600.0

# Messages of transport failures raised as plain RuntimeError by gloo (and NCCL wrappers).
_TRANSPORT_MARKERS = ("Timed out", "timed out", "Connection closed", "Connection reset",
                      "NCCL", "gloo", "Broken pipe", "ProcessGroup")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank/size, rank on its node, collective transport
    (torch.distributed's process-group backend: "nccl" or "gloo") and device."""

    rank: int
    world_size: int
    local_rank: int
    transport: str | None
    device: torch.device


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun (or another launcher) announces it; 1 for a plain process.

    The launcher's environment is its protocol for describing the process group, not a
    behaviour switch: this is the one place the package reads it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """RANK as the launcher announces it (0 for a plain process): this process's rank before the
    process group exists (the launcher's protocol, read here only; see launched_world_size)."""
    return int(os.environ.get("RANK", "0"))


def pick_transport() -> str:
    """NCCL when CUDA is available, gloo otherwise (the CPU test path)."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(transport: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                     single_group: bool = False) -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT). A plain process (no WORLD_SIZE) stays single, or with ``single_group`` gets a
    one-rank group on an in-memory store (Megatron's parallel_state needs a group even for one
    rank). ``timeout_s`` bounds every collective. With NCCL each rank uses ``cuda:LOCAL_RANK``."""
    if timeout_s <= 0:
        raise ConfigError(f"timeout_s={timeout_s} must be positive")
    world = launched_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    transport = transport or pick_transport()
    if transport == "nccl":
        if not torch.cuda.is_available() or torch.cuda.device_count() <= local_rank:
            raise ConfigError(f"transport 'nccl' needs a GPU per rank: local rank {local_rank}, "
                              f"{torch.cuda.device_count()} visible GPU(s); use transport='gloo' on CPU")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world == 1 and not dist.is_initialized() and not single_group:
        return DistInfo(0, 1, 0, None, device)
    if not dist.is_initialized():
        store = dist.HashStore() if world == 1 and "MASTER_ADDR" not in os.environ else None
        dist.init_process_group(transport, timeout=timedelta(seconds=timeout_s),
                                device_id=device if transport == "nccl" else None, store=store,
                                **({"rank": 0, "world_size": 1} if store is not None else {}))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend(), device)


def init_megatron(tp: int, timeout_s: float = DEFAULT_TIMEOUT_S, data_split: bool = True,
                  ep: int = 1, pp: int = 1) -> ParallelContext:
    """Initialise Megatron's ``parallel_state`` with tensor-parallel size ``tp``, pipeline size
    ``pp`` (the remaining ranks are data parallel) and expert-parallel size ``ep`` (MoE experts
    spread over ``ep`` ranks of a stage, carved out of its data-parallel ones) and return its
    context.

    The RNG tracker is Megatron's inference tracker: calibration runs without dropout, and its
    training tracker would seed CUDA generators.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    from .parallel.megatron import megatron_context

    world = dist.get_world_size() if dist.is_initialized() else 1
    if not dist.is_initialized():
        raise ConfigError("init_megatron needs torch.distributed: call init_distributed() first "
                          "(a single process needs WORLD_SIZE=1 MASTER_ADDR/MASTER_PORT set and "
                          "init_distributed(transport='gloo'), or torchrun --nproc-per-node 1)")
    check_megatron_sizes(world, tp, ep, pp)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                                 pipeline_model_parallel_size=pp,
                                 distributed_timeout_minutes=timeout_s / 60.0,
                                 create_gloo_process_groups=False)
    initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    return megatron_context(data_split=data_split)


def check_megatron_sizes(world: int, tp: int, ep: int = 1, pp: int = 1) -> None:
    """Refuse, in one line naming the option, Megatron sizes that do not divide ``world`` ranks:
    ``tp * pp`` must divide them (the rest is data parallel), and ``ep`` times the expert TP size
    (Megatron's default: ``tp``) the ranks of a stage."""
    for option, size in (("--tp", tp), ("--ep", ep), ("--pp", pp)):
        if size < 1:
            raise ConfigError(f"{option} {size} must be >= 1")
    if world % (tp * pp):
        raise ConfigError(f"--tp {tp} x --pp {pp} = {tp * pp} must divide the number of ranks ({world})")
    if (world // pp) % (ep * tp):
        raise ConfigError(f"--ep {ep} x --tp {tp} must divide the {world // pp} rank(s) of a pipeline "
                          f"stage ({world} ranks / --pp {pp})")


def shard_fsdp2(model: nn.Module, device: torch.device | None = None, replicas: int = 1) -> nn.Module:
    """``fully_shard`` every decoder layer of an HF causal LM, then the root, over all ranks;
    returns the model (now an FSDPModule). ``replicas=1``: one 1-D mesh on ``device``'s type;
    ``replicas=R``: HSDP, a ``(R, world / R)`` mesh named ("replicate", "shard") whose rows each
    hold one whole copy of the model, sharded over the row's ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = device or next(model.parameters()).device
    world = dist.get_world_size()
    if replicas < 1 or world % replicas:
        raise ConfigError(f"shard_fsdp2: {replicas} replicas do not divide the {world} ranks")
    if replicas == 1:
        mesh = init_device_mesh(device.type, (world,))
    else:
        mesh = init_device_mesh(device.type, (replicas, world // replicas), mesh_dim_names=("replicate", "shard"))
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ConfigError(f"shard_fsdp2: {type(model).__name__} has no .model.layers to shard; "
                          "apply fully_shard yourself and pass the model to quantize()")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` comes from a failed or timed-out collective (not from this rank's own
    code): torch's DistError family, or a transport RuntimeError from gloo/NCCL."""
    if isinstance(exc, DistributedError) or isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _TRANSPORT_MARKERS)


@contextlib.contextmanager
def collective_failures(timeout_s: float):
    """Re-raise collective failures as DistributedError naming this rank and the likely cause."""
    try:
        yield
    except Exception as exc:
        if not is_collective_failure(exc) or isinstance(exc, DistributedError):
            raise
        rank = dist.get_rank() if dist.is_initialized() else 0
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistributedError(
            f"rank {rank}: a collective failed ({first[:300]}). Another rank most likely raised "
            f"or died: its log shows the cause. Collectives wait at most {timeout_s:g} s "
            "(--dist-timeout / init_distributed(timeout_s=...)).") from exc


def shutdown(barrier: bool = False) -> None:
    """Leave the process group (and Megatron's parallel_state) if joined.

    ``barrier``: first wait until every rank has got here (a run that ended well). A run's last
    collective can return on one rank before another has finished it (a broadcast returns on its
    root once the data is sent); a rank leaving then tears down connections a peer still reads
    from, and a process that exits with its group still joined leaves torch's transport threads
    to the interpreter's teardown, where gloo has been seen to abort the process (SIGABRT,
    "terminate called without an active exception") after a complete run.
    """
    if barrier and dist.is_available() and dist.is_initialized():
        dist.barrier()
    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is not None and ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
