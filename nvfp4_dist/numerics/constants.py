"""Named NVFP4 constants: the one place where 6, 448 and 16 are written down."""

import torch

BLOCK_SIZE = 16  # elements per NVFP4 block, along the input (last, K) dimension
E2M1_MAX = 6.0  # largest E2M1 magnitude
E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448.0
E4M3_MIN_SCALE = 2.0**-9  # smallest positive E4M3 value (subnormal): the block-scale floor
GLOBAL_SCALE_DENOM = E2M1_MAX * E4M3_MAX  # 2688.0: weight_scale_2 = global_amax / 2688
# A global amax below this is raised to it, so that the global scale (amax / 2688) and its
# reciprocal (the compressed-tensors `weight_global_scale`) stay finite, normal fp32 numbers.
MIN_GLOBAL_AMAX = 2.0**-64

# E2M1 code index -> magnitude. Bit 3 of a 4-bit code is the sign (code 8 is -0).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

# Rounding a magnitude m (in units of the quant scale) onto the E2M1 grid, nearest with ties to
# the even code, is a count of thresholds passed. A threshold between an even code (below) and an
# odd code (above) is passed only when m is strictly above it (the tie stays on the even code);
# one between an odd code and the even code above is passed when m >= it (the tie moves up).
#   0.25 -> 0 | 0.75 -> 1 | 1.25 -> 1 | 1.75 -> 2 | 2.5 -> 2 | 3.5 -> 4 | 5 -> 4
E2M1_THRESHOLDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
E2M1_THRESHOLD_INCLUSIVE = (False, True, False, True, False, True, False)

NUM_FP8_CANDIDATES = 126  # finite positive E4M3 values


def e4m3_positive_values() -> torch.Tensor:
    """The 126 finite positive E4M3 values in increasing order, fp32, shape (126,)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    values = codes.view(torch.float8_e4m3fn).float()
    values = values[torch.isfinite(values) & (values > 0)]
    values = torch.unique(values)  # sorted ascending
    assert values.numel() == NUM_FP8_CANDIDATES
    return values
