"""Where the time of a Hessian / DSS search and of fake-quant goes, on one CUDA device.

Run: ``python benchmarks/kernel_breakdown.py [--rows 8192 --cin 4096]``. For a bf16 weight
N(0, 0.02^2) and the benchmark's correlated-activation Hessians it prints (``do_bench`` medians):
the Schur floors in Triton and through the host; the whole ``search_local_hessian`` /
``search_dss`` calls against their kernels alone (sweep, DSS phase); fake-quant against a copy
of the weight, as a ``do_bench`` figure and as back-to-back calls timed on the wall clock (which
shows host overhead); stacked experts' fake-quant in one launch against one per expert; with
``--mse-tiles``, the MSE sweep at other fixed tiles; with ``--dtypes``, the sweep and DSS kernels
and fake-quant for the same weight in bf16, fp16 and fp32. Complements ``bench_kernels.py``, which compares
with ModelOpt.
"""

from __future__ import annotations

import argparse
import time

import torch
from triton.testing import do_bench, do_bench_cudagraph

from bench_kernels import host_us, make_hessian, make_weight
from nvfp4_dist.kernels import dss_kernel, floor_kernel, hessian_kernel, mse_kernel, triton_ops
from nvfp4_dist.kernels import reference as R
from nvfp4_dist.kernels.windows import schur_floor


def ms(fn) -> float:
    return do_bench(fn, rep=300, return_mode="median")


def wall_us(fn, calls: int = 2000) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--cin", type=int, default=4096)
    parser.add_argument("--mse-tiles", action="store_true", help="also time the MSE sweep's tile choices")
    parser.add_argument("--dtypes", action="store_true", help="also time the Hessian sweep and DSS kernels "
                        "for fp16 and fp32 weights")
    args = parser.parse_args()
    w = make_weight((args.rows, args.cin), "gauss", 100)
    g = w.float().abs().amax()
    h = make_hessian(args.cin, 101).contiguous()
    print(f"{torch.cuda.get_device_name()}, weight {args.rows}x{args.cin} bf16")
    print(f"Schur floors: Triton {ms(lambda: floor_kernel.launch_schur_floor(h)) * 1e3:.1f} us, "
          f"torch through the host {ms(lambda: schur_floor(h.cpu()).cuda()) * 1e3:.1f} us")

    whole_h = ms(lambda: triton_ops.search_local_hessian(w, g, h))
    whole_d = ms(lambda: triton_ops.search_dss(w, g, h, R.default_betas()))
    sweep, dss = search_kernels(w, g, h)
    print(f"search_local_hessian {whole_h:.3f} ms (sweep kernel {sweep:.3f} ms)")
    print(f"search_dss {whole_d:.3f} ms (DSS kernel {dss:.3f} ms; DSS phase / sweep "
          f"{(whole_d - whole_h) / whole_h:.2f})")

    bamax = triton_ops.search_mse(w, g).block_amax
    fq, copy = ms(lambda: triton_ops.fake_quant(w, bamax, g)), ms(lambda: w.clone())
    print(f"fake_quant {fq * 1e3:.1f} us, bf16 copy {copy * 1e3:.1f} us (x{fq / copy:.2f}); back to back: "
          f"fake_quant {wall_us(lambda: triton_ops.fake_quant(w, bamax, g)):.1f} us, "
          f"copy {wall_us(w.clone):.1f} us per call")
    graph_fq, graph_copy = graph_ms(lambda: triton_ops.fake_quant(w, bamax, g)), graph_ms(w.clone)
    print(f"in CUDA graphs: fake_quant {graph_fq * 1e3:.1f} us, copy {graph_copy * 1e3:.1f} us "
          f"(x{graph_fq / graph_copy:.2f}); host time per fake_quant call "
          f"{host_us(lambda: triton_ops.fake_quant(w, bamax, g)):.1f} us")
    experts()
    if args.mse_tiles:
        mse_tiles()
    if args.dtypes:
        dtypes(args.rows, args.cin)


def experts(n: int = 128, rows: int = 768, cin: int = 2048) -> None:
    """Fake-quant of stacked experts [n, rows, cin] (a 128-expert MoE projection): one launch with a
    global amax per expert against the former per-expert launches and a stack."""
    w = make_weight((n * rows, cin), "gauss", 8).view(n, rows, cin)
    g = w.float().abs().amax(dim=(1, 2))
    bamax = torch.stack([triton_ops.search_mse(w[e], g[e]).block_amax for e in range(n)])
    one = triton_ops.fake_quant(w, bamax, g)
    loop = torch.stack([triton_ops.fake_quant(w[e], bamax[e], g[e]) for e in range(n)])
    assert torch.equal(one, loop)
    t_one = ms(lambda: triton_ops.fake_quant(w, bamax, g))
    t_loop = ms(lambda: torch.stack([triton_ops.fake_quant(w[e], bamax[e], g[e]) for e in range(n)]))
    print(f"stacked experts {n}x{rows}x{cin} bf16 fake-quant: one launch {t_one * 1e3:.1f} us, per expert + "
          f"stack {t_loop * 1e3:.1f} us, copy {ms(lambda: w.clone()) * 1e3:.1f} us")


def search_kernels(w: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> tuple[float, float]:
    """ms of the Hessian sweep kernel and of the DSS kernel alone (the default grid without 1.0,
    as ``search_dss`` launches it) on ``w``'s coupled optimum."""
    wv, _, s = triton_ops._prepare(w, g)
    hh, kappa = triton_ops._hessian_inputs(wv, h)
    values = triton_ops._values(wv.device)
    betas = R.default_betas()
    betas = betas[betas != 1.0]
    k, loss = hessian_kernel.launch_hessian_sweep(wv, hh, kappa, s, values)
    sweep = ms(lambda: hessian_kernel.launch_hessian_sweep(wv, hh, kappa, s, values))
    clones = ms(lambda: (k.clone(), loss.clone()))
    dss = ms(lambda: dss_kernel.launch_dss_search(wv, hh, s, values, betas, k.clone(), loss.clone()))
    return sweep, dss - clones


def graph_ms(fn, calls: int = 20) -> float:
    """ms of one call of ``fn`` in a CUDA graph of ``calls`` calls: the host taken out, the GPU's time."""
    return do_bench_cudagraph(lambda: [fn() for _ in range(calls)], rep=300) / calls


def dtypes(rows: int, cin: int) -> None:
    """Sweep and DSS kernels and fake-quant for the same Gaussian weight in bf16, fp16 and fp32
    (the searches take the element-wise code chain for fp16 and fp32, fake-quant for fp32)."""
    h = make_hessian(cin, 101).contiguous()
    base = make_weight((rows, cin), "gauss", 100)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        w = base.to(dtype)
        g = w.float().abs().amax()
        sweep, dss = search_kernels(w, g, h)
        bamax = triton_ops.search_mse(w, g).block_amax
        fq, copy = graph_ms(lambda: triton_ops.fake_quant(w, bamax, g)), graph_ms(w.clone)
        print(f"{str(dtype).removeprefix('torch.')} weight: sweep kernel {sweep:.3f} ms, DSS kernel {dss:.3f} ms "
              f"(x{dss / sweep:.2f}); fake-quant {fq * 1e3:.1f} us against a copy {copy * 1e3:.1f} us "
              f"(x{fq / copy:.2f}, CUDA graphs)")


def mse_tiles() -> None:
    """The MSE sweep at each (blocks per program, warps), for an 8B model's weight shapes."""
    for rows, cin in ((4096, 4096), (1024, 4096), (12288, 4096), (4096, 12288)):
        w = make_weight((rows, cin), "gauss", 7)
        _, _, s = triton_ops._prepare(w, w.float().abs().amax())
        values = triton_ops._values(w.device)
        default = mse_kernel.launch_mse_sweep(w, s, values)
        times = []
        for blk, warps in ((32, 1), (64, 1), (64, 2), (128, 2), (128, 4), (256, 4), (256, 8)):
            got = mse_kernel.launch_mse_sweep(w, s, values, blk, warps)
            assert torch.equal(got[0], default[0]) and torch.equal(got[1], default[1])
            times.append(f"{blk}x{warps}w {ms(lambda: mse_kernel.launch_mse_sweep(w, s, values, blk, warps)):.3f}")
        print(f"MSE sweep {rows}x{cin} (ms, blocks x warps; default {mse_kernel.CUDA_BLK}x"
              f"{mse_kernel.CUDA_WARPS}w): " + ", ".join(times))


if __name__ == "__main__":
    main()
