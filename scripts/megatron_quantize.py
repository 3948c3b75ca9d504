"""Calibrate a Megatron-core GPT inside its own TP/DP layout with the Python API, then export HF.

    torchrun --nproc-per-node 2 scripts/megatron_quantize.py --tp 2 --out out/tiny-megatron

The same calls fit a Megatron training script: initialise parallel_state as usual, then
``quantize(model, config, forward_loop)`` (the context is detected from parallel_state) and
``export_checkpoint`` on every rank. Needs megatron-core and, for the GPT forward, CUDA.
"""

from __future__ import annotations

import argparse

from nvfp4_dist import QuantConfig, quantize
from nvfp4_dist.export import export_checkpoint
from nvfp4_dist.launch import collective_failures, init_distributed, init_megatron, shutdown
from nvfp4_dist.models.megatron_gpt import build_megatron_gpt, megatron_forward_loop
from nvfp4_dist.models.tiny import build_embedded, calibration_tokens
from nvfp4_dist.parallel.invariance import float64_forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--out", required=True)
    parser.add_argument("--timeout", type=float, default=300.0, help="collective timeout (s)")
    args = parser.parse_args()

    info = init_distributed(timeout_s=args.timeout, single_group=True)
    with collective_failures(args.timeout):
        ctx = init_megatron(args.tp, timeout_s=args.timeout, data_split=False)
        hf = build_embedded("tiny-dense", seed=0)
        model = build_megatron_gpt(hf, device=info.device)
        loop = float64_forward(megatron_forward_loop(calibration_tokens(1024, 16, 64), batch_size=4))
        result = quantize(model, QuantConfig(method="local_hessian", dss=True), loop, ctx=ctx)
        config = {**hf.config.to_dict(), "architectures": [type(hf).__name__]}
        export_checkpoint(model, result, args.out, fmt="modelopt", overwrite=True, config=config)
    if info.rank == 0:
        print(result.table())
        print(f"written to {args.out}")
    shutdown(barrier=True)  # every rank done before any leaves the process group


if __name__ == "__main__":
    main()
