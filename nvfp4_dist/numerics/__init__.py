"""NVFP4 numerics: constants and pure-torch encode/decode/scale functions."""

from .constants import BLOCK_SIZE, E2M1_MAX, E4M3_MAX, GLOBAL_SCALE_DENOM, NUM_FP8_CANDIDATES
from .nvfp4 import (
    block_amax,
    blocks,
    candidate_block_amax,
    candidate_ratios,
    clamp_global_amax,
    decode,
    e2m1_code_magnitude,
    encode,
    fake_quant,
    global_scale,
    input_scale,
    pack,
    scale_fp8,
    unpack,
)

__all__ = [
    "BLOCK_SIZE", "E2M1_MAX", "E4M3_MAX", "GLOBAL_SCALE_DENOM", "NUM_FP8_CANDIDATES",
    "block_amax", "blocks", "candidate_block_amax", "candidate_ratios", "clamp_global_amax",
    "decode", "e2m1_code_magnitude", "encode", "fake_quant", "global_scale", "input_scale",
    "pack", "scale_fp8", "unpack",
]
