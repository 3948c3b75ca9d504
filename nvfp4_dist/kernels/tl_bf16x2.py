"""Triton device functions on pairs of 16-bit floats held in one int32: the spec's E2M1 code
chain for bf16 (and fp16) weights, two elements per instruction.

For a bf16 magnitude ``a`` and an fp32 threshold ``t > 0``: ``a > t`` iff ``a > RD(t)`` and
``a >= t`` iff ``a >= RU(t)`` (RD/RU: rounded down/up to bf16; no bf16 lies strictly between RD(t)
and t, nor between t and RU(t)). So the spec's seven comparisons (strict at 0.25, 1.25, 2.5, 5,
inclusive at 0.75, 1.75, 3.5, times the quant scale) are bf16 comparisons against rounded
thresholds, and one ``set.{gt,ge}.u32.bf16x2`` compares two elements; one ``lop3`` then selects
both lanes' values. The selected values are whatever the caller puts in both halves of the
operands: the bf16-rounded dequantized values for fake-quant, the exact ``e2m1 * v`` (sweep) or
``e2m1`` (DSS) for the Hessian searches' tensor-core operand. The same holds on the fp16 grid (subnormals and the
overflow to infinity included): fp16 weights take ``set.*.f16x2`` against thresholds rounded to
fp16 (``F16``; fake-quant only).

The PTX runs only on the GPU; under the Triton interpreter the same selection is done with
integer comparisons of the 15-bit magnitudes (non-negative bf16 and fp16 order like their bit
patterns; NaN, above 0x7F80 / 0x7C00, fails every comparison as the hardware's does), so that the
CPU tests check everything but the asm block, which the GPU tests check.
"""

import torch
import triton
import triton.language as tl

# mask = a > t (strict thresholds) or a >= t (inclusive), per bf16 lane as 0xFFFF / 0; then
# q = (mask & q_i) | (~mask & q) (lop3 table 0xCA); finally the sign bits. $1: magnitudes of a
# pair; $2: its sign bits (magnitude_and_sign); $3..$9: thresholds t0..t6 (bf16 in both halves);
# $10..$16: code values q1..q7 (likewise).
_PAIR_CHAIN = tl.constexpr("""{
.reg .b32 m;
set.gt.u32.bf16x2 m, $1, $3;
and.b32 $0, m, $10;
set.ge.u32.bf16x2 m, $1, $4;
lop3.b32 $0, m, $11, $0, 0xCA;
set.gt.u32.bf16x2 m, $1, $5;
lop3.b32 $0, m, $12, $0, 0xCA;
set.ge.u32.bf16x2 m, $1, $6;
lop3.b32 $0, m, $13, $0, 0xCA;
set.gt.u32.bf16x2 m, $1, $7;
lop3.b32 $0, m, $14, $0, 0xCA;
set.ge.u32.bf16x2 m, $1, $8;
lop3.b32 $0, m, $15, $0, 0xCA;
set.gt.u32.bf16x2 m, $1, $9;
lop3.b32 $0, m, $16, $0, 0xCA;
or.b32 $0, $0, $2;
}""")

# the sign bit of each lane of $1 where its magnitude $2 is > 0 and not NaN, i.e. where w < 0
# (-0.0 and NaN get none, as in the reference)
_SIGN_BITS = tl.constexpr("""{
.reg .b32 m, z;
mov.b32 z, 0;
set.gt.u32.bf16x2 m, $2, z;
and.b32 $0, $1, 0x80008000;
and.b32 $0, $0, m;
}""")

_PAIR_CHAIN_F16 = tl.constexpr(_PAIR_CHAIN.value.replace("bf16x2", "f16x2"))
_SIGN_BITS_F16 = tl.constexpr(_SIGN_BITS.value.replace("bf16x2", "f16x2"))

BF16_NAN_BITS = tl.constexpr(0x7F80)  # magnitudes above this are NaN
F16_NAN_BITS = tl.constexpr(0x7C00)

# The seven thresholds of one quant scale q (fp32 bits in $7), each rounded to bf16 in both halves
# of an int32 ($0..$6): prmt 0x3232 copies the top half into both halves (round down); adding
# 0xFFFF first rounds up. fl(2.5 q), fl(3.5 q), fl(5 q) are fl(1.25 q) and fl(1.75 q) times a
# power of two, exact in fp32 and in bf16: an exponent step in each half (0x0080 per factor 2)
# instead of a product and its rounding. For q < 2^124 (FAST_Q_LIMIT) every step stays finite.
_THRESHOLDS = tl.constexpr("""{
.reg .b32 x;
mul.rn.f32 x, $7, 0f3E800000;
prmt.b32 $0, x, 0, 0x3232;
mul.rn.f32 x, $7, 0f3F400000;
add.u32 x, x, 0xFFFF;
prmt.b32 $1, x, 0, 0x3232;
mul.rn.f32 x, $7, 0f3FA00000;
prmt.b32 $2, x, 0, 0x3232;
add.u32 $4, $2, 0x00800080;
add.u32 $6, $2, 0x01000100;
mul.rn.f32 x, $7, 0f3FE00000;
add.u32 x, x, 0xFFFF;
prmt.b32 $3, x, 0, 0x3232;
add.u32 $5, $3, 0x00800080;
}""")
FAST_Q_LIMIT = tl.constexpr(2.0**124)
ONE_OCTAVE = tl.constexpr(0x00800080)  # x2 in both bf16 halves
TWO_OCTAVES = tl.constexpr(0x01000100)  # x4


@triton.jit
def both_halves(x, UP: tl.constexpr):
    """int32 holding fp32 ``x >= 0`` rounded to bf16 (down, or up if ``UP``) in both halves.

    Rounding down keeps the top 16 bits; rounding up adds 0xFFFF first, so any dropped bit
    carries into them (into the exponent when the mantissa is full: the next bf16 value).
    """
    bits = x.to(tl.uint32, bitcast=True)
    if UP:
        bits = bits + 65535
    top = bits & 0xFFFF0000
    return (top | (top >> 16)).to(tl.int32, bitcast=True)


@triton.jit
def scaled_thresholds(q, FULL_RANGE: tl.constexpr, PTX: tl.constexpr):
    """The code chain's thresholds ``t0..t6`` (:func:`pair_chain`) of quant scales ``q > 0``
    (fp32): ``fl(t q)`` for t = 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, rounded down (strict
    thresholds) or up (inclusive ones) to bf16, in both halves.

    Four products instead of seven: ``fl(2.5 q) = 2 fl(1.25 q)``, ``fl(5 q) = 4 fl(1.25 q)`` and
    ``fl(3.5 q) = 2 fl(1.75 q)`` exactly, and rounding to bf16 commutes with powers of two, so
    those are exponent steps of the rounded ``fl(1.25 q)`` and ``fl(1.75 q)``; valid for
    ``q < FAST_Q_LIMIT``. ``FULL_RANGE`` (any q, where a step could overflow into the sign bit)
    takes the seven products.
    """
    if FULL_RANGE:
        return (both_halves(0.25 * q, False), both_halves(0.75 * q, True), both_halves(1.25 * q, False),
                both_halves(1.75 * q, True), both_halves(2.5 * q, False), both_halves(3.5 * q, True),
                both_halves(5.0 * q, False))
    if PTX:
        return tl.inline_asm_elementwise(_THRESHOLDS, "=r,=r,=r,=r,=r,=r,=r,r", [q.to(tl.int32, bitcast=True)],
                                         dtype=(tl.int32,) * 7, is_pure=True, pack=1)
    t2 = both_halves(1.25 * q, False)
    t3 = both_halves(1.75 * q, True)
    return (both_halves(0.25 * q, False), both_halves(0.75 * q, True), t2, t3, t2 + ONE_OCTAVE,
            t3 + ONE_OCTAVE, t2 + TWO_OCTAVES)


@triton.jit
def f16_both_halves(x, UP: tl.constexpr):
    """int32 holding fp32 ``x >= 0`` rounded to fp16 (down, or up if ``UP``; ``UP=None``: to
    nearest, ties to even) in both halves. From the nearest fp16 (a conversion that rounds to
    nearest even on both backends), one step down or up where it lies on the wrong side of x:
    subnormals and the overflow to infinity (or to the largest finite value, rounding down)
    follow from the bit patterns' order."""
    r = x.to(tl.float16)
    bits = r.to(tl.int16, bitcast=True).to(tl.int32) & 65535
    if UP is not None:
        back = r.to(tl.float32)
        if UP:
            bits = tl.where(back < x, bits + 1, bits)
        else:
            bits = tl.where(back > x, bits - 1, bits)
    return bits | (bits << 16)


@triton.jit
def magnitude_and_sign(w, PTX: tl.constexpr, F16: tl.constexpr = False):
    """``(a, s)`` of bf16 (fp16 with ``F16``) pairs ``w`` (int32): the lanes' magnitudes, and their
    sign bits where the lane is negative (not for -0.0 or NaN). Loop-invariant in the searches:
    computed once."""
    a = w & 0x7FFF7FFF
    if PTX:
        asm: tl.constexpr = _SIGN_BITS_F16 if F16 else _SIGN_BITS
        s = tl.inline_asm_elementwise(asm, "=r,r,r", [w, a], dtype=tl.int32, is_pure=True, pack=1)
    else:
        nan = F16_NAN_BITS if F16 else BF16_NAN_BITS
        lo = a & 65535
        hi = (a >> 16) & 65535
        lo_neg = (lo > 0) & (lo <= nan)
        hi_neg = (hi > 0) & (hi <= nan)
        s = w & tl.where(lo_neg, 0x8000, 0) | (w & tl.where(hi_neg, -2147483648, 0))
    return a, s


# select_half and pair_chain take the thresholds t0..t6 and values q1..q7 as 14 separate operands,
# not as two tuples: tuple arguments need Triton >= 3.3 and pyproject.toml accepts 3.2 (see
# :mod:`.tl_nvfp4`). The PTX block takes them as one flat operand list either way.
@triton.jit
def select_half(a, t0, t1, t2, t3, t4, t5, t6, q1, q2, q3, q4, q5, q6, q7, NAN: tl.constexpr):
    """One 16-bit lane of the chain in integers (the interpreter's twin of the PTX)."""
    ok = a <= NAN
    q = tl.where(ok & (a > t0), q1, 0)
    q = tl.where(ok & (a >= t1), q2, q)
    q = tl.where(ok & (a > t2), q3, q)
    q = tl.where(ok & (a >= t3), q4, q)
    q = tl.where(ok & (a > t4), q5, q)
    q = tl.where(ok & (a >= t5), q6, q)
    return tl.where(ok & (a > t6), q7, q)


@triton.jit
def pair_chain(a, s, t0, t1, t2, t3, t4, t5, t6, q1, q2, q3, q4, q5, q6, q7, PTX: tl.constexpr,
               F16: tl.constexpr = False):
    """The selected values of bf16 (fp16 with ``F16``) pairs with magnitudes ``a`` and sign bits
    ``s`` (:func:`magnitude_and_sign`), from per-block (or per-row) operands: thresholds
    ``t0..t6`` on the weight's grid and values ``q1..q7``, one per lane (usually the same value in
    both halves of an int32)."""
    if PTX:
        asm: tl.constexpr = _PAIR_CHAIN_F16 if F16 else _PAIR_CHAIN
        out = tl.inline_asm_elementwise(
            asm, "=r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r",
            [a, s, t0, t1, t2, t3, t4, t5, t6, q1, q2, q3, q4, q5, q6, q7], dtype=tl.int32, is_pure=True, pack=1)
    else:
        m = 65535
        nan: tl.constexpr = F16_NAN_BITS if F16 else BF16_NAN_BITS
        lo = select_half(a & m, t0 & m, t1 & m, t2 & m, t3 & m, t4 & m, t5 & m, t6 & m,
                         q1 & m, q2 & m, q3 & m, q4 & m, q5 & m, q6 & m, q7 & m, nan)
        hi = select_half((a >> 16) & m, (t0 >> 16) & m, (t1 >> 16) & m, (t2 >> 16) & m, (t3 >> 16) & m,
                         (t4 >> 16) & m, (t5 >> 16) & m, (t6 >> 16) & m, (q1 >> 16) & m, (q2 >> 16) & m,
                         (q3 >> 16) & m, (q4 >> 16) & m, (q5 >> 16) & m, (q6 >> 16) & m, (q7 >> 16) & m, nan)
        out = (lo | (hi << 16)) | s
    return out


def pairs_fit(w: torch.Tensor, dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,)) -> bool:
    """True for ``w [rows, cin]`` of one of ``dtypes`` whose pairs are 4-byte aligned (unit cin
    stride, even row stride and offset)."""
    return w.dtype in dtypes and w.stride(-1) == 1 and w.stride(0) % 2 == 0 and w.data_ptr() % 4 == 0
