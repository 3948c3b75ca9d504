"""Helpers of the checkpoint tests: worker-side patches for megatron-core's checkpoint writer and
the per-HF-module records the tests compare across layouts."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))


def allow_megatron_save_in_worker() -> None:
    """megatron-core 0.16's torch_dist writer starts helper processes (a spawn-context Manager
    and forked writers) and calls ``torch.cuda.synchronize`` after staging tensors. The test
    harness runs each rank as a daemonic process, which may not have children, on machines
    without CUDA: clear this worker's daemon flag and make the synchronize a no-op. Test workers
    only; the library never touches either."""
    import multiprocessing

    multiprocessing.current_process()._config["daemon"] = False
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *args, **kwargs: None


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # FSDP2 state: this rank's shard


def slot_records(slots, ctx) -> dict:
    """HF module name -> quantizer buffers and fake-quant weight (from those buffers) of its rows,
    gathered whole over each slot's shard group."""
    from nvfp4_dist.calib.state import read_state
    from nvfp4_dist.numerics.compact import beta_of_codes, block_amax_of_bits
    from nvfp4_dist.numerics import nvfp4
    from nvfp4_dist.parallel.access import local_weight
    from nvfp4_dist.parallel.reduce import gather_slot_tensor

    out = {}
    for slot in slots:
        tensors = {k: _local(v) for k, v in read_state(slot.module, slot.param_name, slot.expert).items()}
        code = tensors.get("dss_beta_code")
        tensors["fq"] = nvfp4.fake_quant(local_weight(slot).detach(),
                                         block_amax_of_bits(tensors["block_scale"], tensors["global_amax"]),
                                         tensors["global_amax"], None if code is None else beta_of_codes(code))
        whole = {}
        for key, value in tensors.items():
            if value is None or value.dim() == 0:
                whole[key] = value
                continue
            per_col = 1 if key == "fq" else 16
            whole[key] = gather_slot_tensor(value.contiguous(), slot.layout, ctx, elems_per_col=per_col)
        for part in slot.parts():
            out[part.name] = {k: (v if v is None or v.dim() == 0 else v[part.rows]).detach().cpu().clone()
                              for k, v in whole.items()}
    return out


def differences(ref: dict, got: dict) -> list[str]:
    """Names of (module, tensor) pairs that are not bit-identical (or missing)."""
    bad = [f"{name}: missing" for name in ref if name not in got]
    for name, tensors in ref.items():
        for key, value in tensors.items():
            other = got.get(name, {}).get(key)
            if other is None or value is None:
                if (other is None) != (value is None):
                    bad.append(f"{name}.{key}: present on one side only")
                continue
            if value.shape != other.shape or not torch.equal(value, other):
                bad.append(f"{name}.{key}")
    return bad
