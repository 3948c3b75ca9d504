"""W4A4 forward of transformers' fused experts, all experts at once (one activation fake-quant per
projection for every expert's rows, grouped GEMMs): the same bits as the eager per-expert loop on
the CPU, forward and through quantize()'s installed fake-quant; gradients straight through."""

import functools

import pytest
import torch

import nvfp4_dist as nd
from nvfp4_dist.kernels import dispatch
from nvfp4_dist.parallel.hf_experts_w4a4 import experts_forward_w4a4, experts_forward_w4a4_loop
from moe_testutil import forward_loop, small_moe, tokens


def _bits(t):
    return t.float().view(torch.int32)


def _experts(model_type, dtype, n_experts=6):
    model = small_moe(model_type, "eager", seed=3, num_experts=n_experts)
    return model.model.layers[0].mlp.experts.to(dtype)


def _quant_input(amaxes):
    """Per-expert static input amaxes ``{param: [E]}``: one expert index, or one per row."""
    def quant(module, x, expert, param):
        if isinstance(expert, torch.Tensor):
            return dispatch.fake_quant_input(x, amaxes[param], kernels="torch", row_scale=expert)
        return dispatch.fake_quant_input(x, amaxes[param][expert], kernels="torch")
    return quant


def _routing(tokens_, n_experts, k, seed, dtype):
    """Top-k routing of ``tokens_`` tokens that never picks expert 4 (no rows) and sends one
    choice nowhere (index ``n_experts``: an expert-parallel sentinel)."""
    gen = torch.Generator().manual_seed(seed)
    live = torch.tensor([e for e in range(n_experts) if e != 4])
    top_k = torch.stack([live[torch.randperm(live.numel(), generator=gen)[:k]] for _ in range(tokens_)])
    top_k[5, 1] = n_experts
    weights = torch.rand(tokens_, k, generator=gen).to(dtype)
    return top_k, weights


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grouped_forward_equals_the_per_expert_loop(model_type, dtype):
    """Top-3 (a token's three contributions add in the loop's expert order), an expert without
    rows, a routing index outside the experts, expert 2 with a zero input amax (a dead expert's
    clamped scale)."""
    experts = _experts(model_type, dtype)
    first = "gate_up_proj"
    gen = torch.Generator().manual_seed(4)
    amaxes = {first: torch.rand(6, generator=gen) * 4 + 0.5, "down_proj": torch.rand(6, generator=gen) * 0.5 + 0.05}
    amaxes[first][2] = 0.0
    hidden = (torch.randn(24, 64, generator=gen) * 2).to(dtype)
    top_k, weights = _routing(24, 6, 3, seed=5, dtype=dtype)
    quant = _quant_input(amaxes)
    with torch.no_grad():
        want = experts_forward_w4a4_loop(experts, quant, hidden, top_k, weights)
        got = experts_forward_w4a4(experts, quant, hidden, top_k, weights)
    assert got.dtype == dtype and torch.equal(_bits(got), _bits(want))
    assert want.abs().sum() > 0 and torch.equal(want[5] != 0, want[6] != 0)  # the sentinel only drops a term
    # each expert's rows really take their own scale: one shared scale changes the output
    shared = _quant_input({p: a.max().expand(6) for p, a in amaxes.items()})
    with torch.no_grad():
        assert not torch.equal(experts_forward_w4a4(experts, shared, hidden, top_k, weights), want)
    # nothing routed anywhere: zeros
    with torch.no_grad():
        none = experts_forward_w4a4(experts, quant, hidden, torch.full_like(top_k, 6), weights)
    assert torch.equal(none, torch.zeros_like(hidden))


def test_installed_forward_is_the_grouped_path_and_matches_the_loop():
    """After quantize(quantize_inputs=True) the experts run the grouped forward: its output and
    the loop's with the installed per-expert quantization are the same bits, and QAT's gradients
    (straight through) agree."""
    model = small_moe("qwen3_moe", "grouped_mm", num_experts=4)
    ids = tokens(4, 16)
    nd.quantize(model, nd.QuantConfig(method="max", quantize_inputs=True), forward_loop(ids), show_progress=False)
    experts = model.model.layers[1].mlp.experts
    assert isinstance(experts.forward, functools.partial) and experts.forward.func is experts_forward_w4a4
    grouped = experts.forward
    loop = functools.partial(experts_forward_w4a4_loop, *grouped.args)  # the installed quantization
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(12, 64, generator=gen)
    top_k = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(12)])
    weights = torch.rand(12, 2, generator=gen)
    outs, grads = [], []
    for forward in (grouped, loop):  # through the module: its hooks swap in the weights' images
        experts.forward = forward
        with torch.no_grad():
            outs.append(experts(hidden, top_k, weights))
        experts.zero_grad()
        h = hidden.clone().requires_grad_()
        experts(h, top_k, weights).square().sum().backward()
        grads.append((h.grad, experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()))
    experts.forward = grouped
    assert torch.equal(_bits(outs[0]), _bits(outs[1]))
    for got, want in zip(*grads):
        assert got.abs().sum() > 0 and torch.allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_grouped_forward_on_the_gpu_at_qwen3_30b_a3b_shapes():
    """128 experts (hidden 2048, intermediate 768), 512 tokens top-8, bf16 on the GPU: the
    activation fake-quant of all experts' rows (one launch) has the CPU reference's bits per
    expert; the forward (grouped GEMMs on Hopper) launches a number of kernels independent of the
    expert count and is close to the loop's (other GEMM kernels: roundings, and so a few
    activation codes, may differ); a sentinel-routed choice gets no gradient and no NaN."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(hidden_size=2048, moe_intermediate_size=768, num_experts=128, hidden_act="silu")
    experts = Qwen3MoeExperts(cfg).to("cuda", torch.bfloat16)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.02)
        experts.down_proj.normal_(0, 0.02)
    gen = torch.Generator().manual_seed(1)
    amaxes = {"gate_up_proj": (torch.rand(128, generator=gen) * 8 + 1).cuda(),
              "down_proj": (torch.rand(128, generator=gen) * 0.5 + 0.1).cuda()}
    amaxes["gate_up_proj"][7] = 0.0
    top_k, weights = _routing(512, 128, 8, seed=2, dtype=torch.bfloat16)
    top_k, weights = top_k.cuda(), weights.cuda()
    hidden = (torch.randn(512, 2048, generator=gen) * 2).to("cuda", torch.bfloat16)
    quant = _quant_input_auto(amaxes)

    choices = torch.sort(top_k.reshape(-1).clamp(max=128), stable=True).indices  # rows by expert
    rows, experts_of = hidden[choices // 8], top_k.reshape(-1)[choices].clamp(max=127)
    got = dispatch.fake_quant_input(rows, amaxes["gate_up_proj"], row_scale=experts_of)  # Triton
    want = torch.empty_like(rows, device="cpu")
    for e in range(128):
        sel = (experts_of == e).cpu()
        want[sel] = dispatch.fake_quant_input(rows.cpu()[sel], amaxes["gate_up_proj"][e].cpu(), kernels="torch")
    assert torch.equal(_bits(got.cpu()), _bits(want))

    from torch.profiler import ProfilerActivity, profile
    with torch.no_grad():
        want = experts_forward_w4a4_loop(experts, quant, hidden, top_k, weights)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            got = experts_forward_w4a4(experts, quant, hidden, top_k, weights)
            torch.cuda.synchronize()
    launches = sum(1 for e in prof.events() if e.device_type.name == "CUDA")
    # fewer than one launch per expert (59 on an H200 with torch 2.11; the loop launches > 10 per
    # expert): a bound on the design, not on one torch release's kernel count
    assert launches < 128, launches
    assert torch.isfinite(got).all()
    assert (got.float() - want.float()).norm() <= 0.02 * want.float().norm()
    h = hidden.clone().requires_grad_()
    experts_forward_w4a4(experts, quant, h, top_k, weights).float().square().sum().backward()
    assert torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0


def _quant_input_auto(amaxes):
    """:func:`_quant_input` through the default dispatch (Triton on CUDA), straight-through."""
    def quant(module, x, expert, param):
        if isinstance(expert, torch.Tensor):
            fq = dispatch.fake_quant_input(x, amaxes[param], row_scale=expert)
        else:
            fq = dispatch.fake_quant_input(x, amaxes[param][expert])
        return x + (fq - x).detach() if x.requires_grad else fq
    return quant
