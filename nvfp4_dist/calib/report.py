"""Run report: per-layer errors of the searched scales against plain max calibration."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerReport:
    """Quality figures of one weight (sums over its shards; ratios via the properties)."""

    name: str
    shape: tuple[int, int]
    method: str
    tokens: int
    dead: bool
    sums: torch.Tensor = field(repr=False)  # fp64 [5]: |W|^2, |W-Q|^2, |W-Qmax|^2, Hloss, Hloss_max
    empty_blocks: int = 0  # this rank's block columns whose Hessian was empty (MSE search there)

    @property
    def rel_error(self) -> float:
        return float((self.sums[1] / self.sums[0].clamp_min(1e-30)).sqrt())

    @property
    def rel_error_max(self) -> float:
        return float((self.sums[2] / self.sums[0].clamp_min(1e-30)).sqrt())

    @property
    def hessian_loss(self) -> float | None:
        return float(self.sums[3]) if self.sums[4] > 0 else None

    @property
    def hessian_loss_max(self) -> float | None:
        return float(self.sums[4]) if self.sums[4] > 0 else None


def error_sums(w: torch.Tensor, fq: torch.Tensor, fq_max: torch.Tensor,
               hessian: torch.Tensor | None) -> torch.Tensor:
    """fp64 [5] partial sums of a shard (see :class:`LayerReport`), on the host.

    A report, not the search's objective: fp32 accumulation on the weight's device, and the
    Hessian sums as ``sum_b <H_b, G_b>`` with per-column Gram matrices ``G_b = sum_rows dw_b
    dw_b^T`` (one batched product; the spec's 16-pass form cost ~1 s per 8B model on an H200).
    """
    out = torch.zeros(5, dtype=torch.float64)
    if w.numel() == 0:
        return out
    wf = w.float()
    errors = (wf - fq.float(), wf - fq_max.float())
    sums = [wf.square().sum(), *(e.square().sum() for e in errors)]
    if hessian is not None:
        h = hessian.to(device=w.device, dtype=torch.float32)
        for e in errors:
            blocks = e.reshape(-1, e.shape[-1] // 16, 16).transpose(0, 1)  # [nb, rows, 16]
            sums.append((torch.bmm(blocks.transpose(1, 2), blocks) * h).sum())
    out[:len(sums)] = torch.stack(sums).double().cpu()  # one transfer per weight
    return out


def format_table(rows: list[LayerReport]) -> str:
    """Plain-text table of the report (one line per weight)."""
    head = f"{'layer':<58} {'shape':>13} {'method':>14} {'tokens':>8} {'rel.err':>9} {'max':>9} {'H-loss/max':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = "" if r.hessian_loss is None else f"{r.hessian_loss / max(r.hessian_loss_max, 1e-30):.4f}"
        name = r.name if len(r.name) <= 58 else "…" + r.name[-57:]
        mark = "*" if r.dead else "+" if r.empty_blocks else ""
        lines.append(f"{name:<58} {r.shape[0]:>6}x{r.shape[1]:<6} {r.method + mark:>14} "
                     f"{r.tokens:>8} {r.rel_error:>9.5f} {r.rel_error_max:>9.5f} {ratio:>10}")
    if any(r.dead for r in rows):
        lines.append("* dead: no calibration token reached this weight; weight-only MSE scales used")
    if any(r.empty_blocks and not r.dead for r in rows):
        lines.append("+ inputs always zero on some 16-channel blocks (empty Hessian): MSE scales there")
    return "\n".join(lines)
