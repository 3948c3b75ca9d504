"""Kernel benchmark: our Triton searches and fake-quant against ModelOpt 0.47.0's fused sweeps.

Run on a CUDA machine: ``python benchmarks/bench_kernels.py [--out FILE.md] [--quick]``.
For each weight shape (bf16; N(0, 0.02^2) and Student-t(2.5) * 0.02) and a Hessian from 2048
correlated activation rows, it times (``triton.testing.do_bench``, median):
  * our MSE sweep, Hessian sweep and DSS search (21 betas), and ModelOpt's
    ``nvfp4_fp8_scale_sweep`` / ``nvfp4_fp8_scale_sweep_hessian`` on the same inputs when
    ``nvidia-modelopt`` is importable (its Hessian kernel is warmed up first);
  * our torch reference MSE search (smallest shape only);
  * fake-quant forward against a plain copy of the bf16 weight (GPU time, in CUDA graphs), and
    the host time of one fake-quant call.
It checks that our chosen candidates equal our reference's (MSE: identical on every block of
a 1024-row slice; Hessian: loss-exact, see ``hessian_kernel.HESSIAN_REL_TOL``) and reports how
often ModelOpt picks the same scale. Prints one markdown table and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

from nvfp4_dist.kernels import dss_kernel, hessian_kernel, triton_ops
from nvfp4_dist.kernels import reference as R
from nvfp4_dist.kernels.candidates import CandidateTables, dss_errors
from nvfp4_dist.kernels.hessian_kernel import HESSIAN_REL_TOL
from nvfp4_dist.kernels.windows import schur_floor
from nvfp4_dist.numerics import nvfp4

SHAPES = ((8192, 4096), (4096, 14336), (28672, 8192))
CHECK_ROWS = 1024  # rows are independent: the reference check runs on a slice


def make_weight(shape, kind: str, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    if kind == "gauss":
        w = torch.randn(shape, device="cuda", generator=gen) * 0.02
    else:  # Student-t(2.5): a normal over the root of a scaled chi-square
        z = torch.randn(shape, device="cuda", generator=gen)
        chi2 = torch.distributions.Chi2(torch.tensor(2.5, device="cuda")).sample(shape)
        w = z / torch.sqrt(chi2 / 2.5) * 0.02
    return w.bfloat16()


def make_hessian(cin: int, seed: int, tokens: int = 2048) -> torch.Tensor:
    """Per-cin-block Hessians of 2048 activation rows with an 8-factor common component."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    f = torch.randn(tokens, 8, device="cuda", generator=gen)
    mix = torch.randn(8, cin, device="cuda", generator=gen) / 8**0.5
    x = f @ mix + 0.5 * torch.randn(tokens, cin, device="cuda", generator=gen)
    xb = x.view(tokens, cin // 16, 16).transpose(0, 1)
    return torch.bmm(xb.transpose(1, 2), xb) / tokens


def load_modelopt():
    try:
        from modelopt.torch.kernels.quantization.gemm.nvfp4_fp8_sweep import (
            nvfp4_fp8_scale_sweep, nvfp4_fp8_scale_sweep_hessian)
    except Exception as exc:  # absent or broken install: report and bench ours alone
        print(f"ModelOpt not available ({type(exc).__name__}: {exc})")
        return None
    import modelopt
    return modelopt.__version__, nvfp4_fp8_scale_sweep, nvfp4_fp8_scale_sweep_hessian


def bench(fn, ms: float = 400.0) -> float:
    return do_bench(fn, warmup=100, rep=ms, return_mode="median")


def host_us(fn, calls: int = 200) -> float:
    """Host time of one call, with the GPU kept busy so that no launch waits for the queue."""
    torch.cuda._sleep(10**9)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    return elapsed


def hessian_check(w, g, h, got, ref, where=None) -> float:
    """Fraction of blocks (of ``where``) meeting the loss-exact criterion (should be 1.0)."""
    tables = CandidateTables(g, w.device)
    wb = nvfp4.blocks(w.float())

    def loss(choice):
        beta = torch.ones_like(choice.loss) if choice.dss_beta is None else choice.dss_beta
        dw = dss_errors(wb, choice.candidate, beta, tables).double()
        return torch.einsum("rbi,bij,rbj->rb", dw, h.double(), dw)

    a = wb.double().abs()
    scale = torch.einsum("rbi,bij,rbj->rb", a, h.double().abs(), a)
    ok = loss(got) <= loss(ref) + HESSIAN_REL_TOL * scale
    return float((ok if where is None else ok[where]).double().mean())


def same_fp8_scale(amax_a: torch.Tensor, amax_b: torch.Tensor, g: torch.Tensor) -> float:
    """Fraction of blocks whose stored FP8 scales agree. Block amaxes are compared through the
    FP8 cast, not as floats: ModelOpt forms c_k * g with CUDA's reciprocal-multiply division,
    ours is correctly rounded, so equal choices can differ in the amax's last bit."""
    return float((nvfp4.scale_fp8(amax_a, g).float() == nvfp4.scale_fp8(amax_b, g).float()).double().mean())


def run_shape(shape, kind, seed, modelopt, quick) -> dict:
    w = make_weight(shape, kind, seed)
    g = w.float().abs().amax()
    h = make_hessian(shape[1], seed + 1)
    row = {"shape": f"{shape[0]}x{shape[1]}", "kind": kind, "blocks_M": w.numel() / 16 / 1e6}
    ms = 200.0 if quick else 400.0

    mse = triton_ops.search_mse(w, g)
    row["mse_ms"] = bench(lambda: triton_ops.search_mse(w, g), ms)
    part = w[:CHECK_ROWS]
    ref = R.search_mse(part, g)
    row["mse_equal_ref"] = bool(torch.equal(mse.candidate[:CHECK_ROWS], ref.candidate)
                                and torch.equal(mse.loss[:CHECK_ROWS], ref.loss))
    hess = triton_ops.search_local_hessian(w, g, h)
    row["hess_ms"] = bench(lambda: triton_ops.search_local_hessian(w, g, h), ms)
    ref_h = R.search_local_hessian(part, g, h)
    ours_h = triton_ops.search_local_hessian(part, g, h)
    row["hess_exact_frac"] = hessian_check(part, g, h, ours_h, ref_h)
    same_start = ours_h.candidate == ref_h.candidate  # DSS is centred on the coupled optimum
    betas = R.default_betas()
    row["dss_ms"] = bench(lambda: triton_ops.search_dss(w, g, h, betas), ms)
    dss_part = triton_ops.search_dss(part, g, h, betas)
    row["dss_exact_frac"] = hessian_check(part, g, h, dss_part, R.search_dss(part, g, h, betas), same_start)

    # fake-quant and the copy in CUDA graphs of 20 calls: the GPU's time, not the host's (one
    # fake_quant call costs ~40 us of Python and launch, about its kernel's time, so a plain
    # do_bench of it measures the host); the host time has its own column
    fq = lambda: triton_ops.fake_quant(w, mse.block_amax, g)  # noqa: E731
    row["fq_ms"] = do_bench_cudagraph(lambda: [fq() for _ in range(20)], rep=ms, return_mode="median") / 20
    row["copy_ms"] = do_bench_cudagraph(lambda: [w.clone() for _ in range(20)], rep=ms, return_mode="median") / 20
    row["fq_host_us"] = host_us(fq)
    if shape == SHAPES[0]:
        row["torch_ref_mse_ms"] = bench(lambda: R.search_mse(w, g), 1000.0)

    if modelopt is not None:
        _, mo_mse, mo_hess = modelopt
        mo_amax = mo_mse(w, g)
        row["mo_mse_ms"] = bench(lambda: mo_mse(w, g), ms)
        row["mo_mse_same"] = same_fp8_scale(mo_amax.view_as(mse.block_amax), mse.block_amax, g)
        mo_hamax = mo_hess(w, g, h)
        row["mo_hess_ms"] = bench(lambda: mo_hess(w, g, h), ms)
        row["mo_hess_same"] = same_fp8_scale(mo_hamax.view_as(hess.block_amax), hess.block_amax, g)
    del w, h
    torch.cuda.empty_cache()
    return row


def hessian_configs(shape, seed) -> list[str]:
    """Hessian sweep and DSS times for other fixed tiles (rows per program, warps)."""
    w = make_weight(shape, "gauss", seed)
    g = w.float().abs().amax()
    h = make_hessian(shape[1], seed + 1)
    s = nvfp4.global_scale(g).reshape(1)
    values = triton_ops._values(w.device)
    kappa = schur_floor(h).contiguous()
    betas = R.default_betas()
    out = []
    for blk_r, warps in ((32, 2), (32, 4), (64, 4), (64, 8), (128, 4), (128, 8)):
        sweep = lambda: hessian_kernel.launch_hessian_sweep(w, h, kappa, s, values, blk_r, warps)  # noqa: E731
        k, loss = sweep()
        t_sweep = bench(sweep, 300.0)
        t_dss = bench(lambda: dss_kernel.launch_dss_search(w, h, s, values, betas, k.clone(), loss.clone(),
                                                               blk_r, warps), 300.0)
        out.append(f"hessian tile {blk_r} rows x {warps} warps: sweep {t_sweep:.3f} ms, dss phase {t_dss:.3f} ms")
        print(out[-1], flush=True)
    return out


def table(rows, modelopt) -> str:
    head = ["weight", "kind", "blocks (M)", "MSE ours ms", "MSE ModelOpt ms", "MSE x", "MSE = ref",
            "MSE same as MO", "Hess ours ms", "Hess ModelOpt ms", "Hess x", "Hess loss-exact",
            "DSS ms", "DSS / Hess", "DSS loss-exact", "fake-quant ms", "bf16 copy ms", "FQ / copy",
            "FQ host us"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mo_m, mo_h = r.get("mo_mse_ms"), r.get("mo_hess_ms")
        cells = [r["shape"], r["kind"], f"{r['blocks_M']:.2f}", f"{r['mse_ms']:.3f}",
                 "-" if mo_m is None else f"{mo_m:.3f}", "-" if mo_m is None else f"{mo_m / r['mse_ms']:.2f}",
                 str(r["mse_equal_ref"]), "-" if mo_m is None else f"{r['mo_mse_same']:.4f}",
                 f"{r['hess_ms']:.3f}", "-" if mo_h is None else f"{mo_h:.3f}",
                 "-" if mo_h is None else f"{mo_h / r['hess_ms']:.2f}", f"{r['hess_exact_frac']:.4f}",
                 f"{r['dss_ms']:.3f}", f"{r['dss_ms'] / r['hess_ms']:.2f}", f"{r['dss_exact_frac']:.4f}",
                 f"{r['fq_ms']:.3f}", f"{r['copy_ms']:.3f}", f"{r['fq_ms'] / r['copy_ms']:.2f}",
                 f"{r['fq_host_us']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the markdown table (and a .json) here")
    parser.add_argument("--quick", action="store_true", help="smallest shape only, shorter timings")
    parser.add_argument("--kinds", default="gauss,heavy")
    parser.add_argument("--hessian-tiles", action="store_true", help="also time other Hessian/DSS tiles")
    args = parser.parse_args()
    torch.manual_seed(0)
    modelopt = load_modelopt()
    if modelopt is not None:  # its first Hessian call may build an extension: keep it out of the timings
        w = make_weight((256, 256), "gauss", 0)
        modelopt[2](w, w.float().abs().amax(), make_hessian(256, 1))
        torch.cuda.synchronize()
    shapes = SHAPES[:1] if args.quick else SHAPES
    tiles = hessian_configs(SHAPES[0], 7) if args.hessian_tiles else []
    rows = []
    for i, shape in enumerate(shapes):
        for kind in args.kinds.split(","):
            rows.append(run_shape(shape, kind, 100 + i, modelopt, args.quick))
            print(json.dumps(rows[-1]), flush=True)
    ref_ms = [r["torch_ref_mse_ms"] for r in rows if "torch_ref_mse_ms" in r]
    header = (f"device: {torch.cuda.get_device_name()}; date: {datetime.date.today()}; torch {torch.__version__}, "
              f"triton {triton.__version__}, python {platform.python_version()}; ModelOpt: "
              f"{modelopt[0] if modelopt else 'not installed'}\n"
              f"torch reference MSE search ({SHAPES[0][0]}x{SHAPES[0][1]}, on the GPU): "
              + ", ".join(f"{m:.1f} ms" for m in ref_ms))
    text = header + "\n\n" + table(rows, modelopt) + "".join("\n" + t for t in tiles)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
        with open(args.out.rsplit(".", 1)[0] + ".json", "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
