"""Names of fused groups: sibling linears that inference engines merge into one GEMM.

Engines load q/k/v (and gate/up, w1/w3, MLA's q_a/kv_a) as one merged weight with one
``weight_scale_2``, so the siblings must share one global amax and one precision. The same table
decides which siblings share their input statistics (they read the same input tensor).
"""

from __future__ import annotations

# Sibling module names that inference engines fuse, so they must share one global scale;
# value: (fused-group suffix, whether the siblings read the same input tensor).
FUSED_SIBLINGS = {
    "q_proj": ("qkv", True), "k_proj": ("qkv", True), "v_proj": ("qkv", True),
    "gate_proj": ("gate_up", True), "up_proj": ("gate_up", True),
    "w1": ("w13", True), "w3": ("w13", True),
    "q_a_proj": ("mla_a", True), "kv_a_proj_with_mqa": ("mla_a", True),
    "query": ("qkv", True), "key": ("qkv", True), "value": ("qkv", True),
}


def fused_keys(name: str) -> tuple[str, str]:
    """(fused_group, stats_key) of a linear named ``name`` from the sibling table."""
    parent, _, leaf = name.rpartition(".")
    if leaf in FUSED_SIBLINGS:
        suffix, shared_input = FUSED_SIBLINGS[leaf]
        group = f"{parent}.{suffix}" if parent else suffix
        return group, (group + ".input" if shared_input else name)
    return name, name
