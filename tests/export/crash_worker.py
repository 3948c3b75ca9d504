"""A tiny export run in its own process, for the crash tests: stops (sleeps) at a named publish
step through the library's test hook (``outdir.stage_hook``) so the test can SIGKILL it there.

    python crash_worker.py OUT SEED STAGE FLAG [--fallback]

STAGE ``none`` runs to the end. ``--fallback`` disables renameat2 (journaled publish).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn


class Two(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.up_proj, self.down_proj = nn.Linear(64, 128, bias=False), nn.Linear(128, 64, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)

    def forward(self, x):
        return self.down_proj(self.up_proj(x))


def run_export(out, seed: int, **kwargs):
    from nvfp4_dist import QuantConfig, quantize
    from nvfp4_dist.export import export_checkpoint

    model = Two(seed)
    result = quantize(model, QuantConfig(method="max", quantize_inputs=False), show_progress=False)
    # a small shard bound: several files, several pieces written one after the other
    return export_checkpoint(model, result, out, overwrite=True, max_shard_size=4096, **kwargs)


def main(argv):
    out, seed, stage, flag = argv[:4]
    import nvfp4_dist.export.outdir as outdir

    if "--fallback" in argv:
        outdir._renameat2 = None

    def hook(name):
        if name == stage:
            Path(flag).write_text(name)
            time.sleep(600)

    outdir.stage_hook = hook
    run_export(out, int(seed))
    Path(flag).write_text("done")


if __name__ == "__main__":
    main(sys.argv[1:])
