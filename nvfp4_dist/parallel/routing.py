"""Routed tokens: which rows of an MoE layer's hidden states each expert computes on.

An expert's statistics (Hessians, token count, input amax) come from exactly the tokens its layer
routes to it: the rows ``t`` of the layer's hidden states whose top-k expert indices contain the
expert. Indices outside ``[0, num_experts)`` (transformers' expert-parallel sentinels) reach no
expert. With ``DeadExpertPolicy.ROUTE_ALL`` every token counts for every expert (statistics
only: the model's output still follows the router).
"""

from __future__ import annotations

import torch


def routed_tokens(top_k_index: torch.Tensor, num_experts: int, route_all: bool = False) -> list[torch.Tensor]:
    """Token rows each expert computes on.

    ``top_k_index``: int ``[tokens, k]``, the router's expert choice per token. Returns one
    int64 index tensor per expert (ascending rows, possibly empty); with ``route_all`` every
    expert gets every row.
    """
    tokens, k = top_k_index.shape
    device = top_k_index.device
    if route_all:
        every = torch.arange(tokens, device=device)
        return [every for _ in range(num_experts)]
    flat = top_k_index.reshape(-1).long()
    rows = torch.arange(tokens, device=device).repeat_interleave(k)
    valid = (flat >= 0) & (flat < num_experts)
    flat, rows = flat[valid], rows[valid]
    # A stable sort by expert keeps each expert's rows in ascending token order.
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    return list(torch.split(rows[order], counts))
