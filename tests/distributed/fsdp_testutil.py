"""FSDP2 test helpers shared by test_fsdp2.py and test_hsdp.py: the method table, a spy that
counts gathers during the search, and the whole fake-quant weights of a distributed run."""

from __future__ import annotations

import torch

from nvfp4_dist.numerics import nvfp4

METHODS = {"max": dict(method="max"), "mse": dict(method="mse"),
           "local_hessian": dict(method="local_hessian"),
           "dss": dict(method="local_hessian", dss=True)}


class _Spy:
    """Counts unshard / full_tensor / all-gather calls while ``active``; records search inputs."""

    def __init__(self):
        import torch.distributed as dist
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        import nvfp4_dist.calib.pipeline as pipeline
        import nvfp4_dist.calib.stages as stages

        self.active = False
        self.calls: list[str] = []
        self.searched: list[tuple[tuple[int, ...], torch.Tensor | None]] = []
        for owner, name in ((FSDPModule, "unshard"), (DTensor, "full_tensor"),
                            (dist, "all_gather"), (dist, "all_gather_into_tensor"),
                            (dist, "all_gather_object"), (dist, "gather")):
            self._wrap(owner, name)
        observe, attach, search = stages.observe, pipeline.apply_states, stages.search_block_scales

        def observe_then_watch(*args, **kwargs):
            out = observe(*args, **kwargs)
            self.active = True
            return out

        def attach_and_stop(*args, **kwargs):
            self.active = False
            return attach(*args, **kwargs)

        def recording_search(w, g, method, hessian=None, **kwargs):
            self.searched.append((tuple(w.shape), hessian))
            return search(w, g, method, hessian=hessian, **kwargs)

        stages.observe, pipeline.apply_states = observe_then_watch, attach_and_stop
        stages.search_block_scales = recording_search

    def _wrap(self, owner, name):
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            if self.active:
                self.calls.append(name)
            return original(*args, **kwargs)

        setattr(owner, name, counted)


def _fq_whole(result, ctx):
    from nvfp4_dist.parallel.access import local_weight
    from nvfp4_dist.parallel.reduce import gather_slot_tensor

    out = {}
    for slot in result.slots:
        state = result.states[slot.name]
        fq = nvfp4.fake_quant(local_weight(slot), state.block_amax(), state.global_amax, state.dss_beta())
        out[slot.name] = gather_slot_tensor(fq, slot.layout, ctx)
    return out
