"""Element formats: sign/exponent/mantissa floating point (ExMy) with a real exponent bias, and INT.

Everything here is pure tensor math (no modules, no model knowledge). The FP quantizer follows
LLM-FP4 (spec 1.3): clip to the format's maximum, take the exponent with the subnormal clamp,
round to the step of that binade (half to even). There is no Inf/NaN encoding.

A format's `numerics` is "paper" (the formulas above) or "reference": what the released LLM-FP4 code
computes. It evaluates the clip factor (2 - 2^-M) with M held as an int64 tensor, where the integer power
2^-M truncates to 0 for M >= 1, so its maximum is 2 * 2^(2^E - 1 - b) and the top binade rounds up to that
value, which the format does not have (M = 0 is unaffected); it also forms the step as 2.0 ** ((e - M) - b),
which differs from exp2(e - (b + M)) in the last bit. Its parameter files were searched under these numerics and only reproduce under them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

# Absmax values below this are treated as this value, so an all-zero row or channel gets a large
# finite bias (and quantizes to exact zeros) instead of +inf and then NaN.
MIN_ABSMAX = 2.0 ** -32
NUMERICS = ("paper", "reference")


@dataclass(frozen=True)
class FPFormat:
    """A floating-point format with 1 sign bit, `exponent_bits` and `mantissa_bits`."""

    exponent_bits: int
    mantissa_bits: int
    numerics: str = "paper"  # or "reference" (see the module docstring)

    def __post_init__(self):
        if self.exponent_bits < 1 or self.mantissa_bits < 0:
            raise ValueError(f"invalid FP format E{self.exponent_bits}M{self.mantissa_bits}: need E >= 1 and M >= 0")
        if self.numerics not in NUMERICS:
            raise ValueError(f"FP numerics must be one of {NUMERICS}, got {self.numerics!r}")

    @classmethod
    def from_bits(cls, bits: int, exponent_bits: int, numerics: str = "paper") -> "FPFormat":
        if not 2 <= bits <= 16 or not 1 <= exponent_bits <= bits - 1:
            raise ValueError(f"{bits}-bit FP needs 1 <= exponent bits <= {bits - 1}, got {exponent_bits}")
        return cls(exponent_bits, bits - 1 - exponent_bits, numerics)

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def name(self) -> str:
        return f"E{self.exponent_bits}M{self.mantissa_bits}"

    @property
    def max_exponent_code(self) -> int:
        return 2 ** self.exponent_bits - 1

    @property
    def clip_factor(self) -> float:
        if self.numerics == "reference":  # 2 - int(2^-M): the integer power truncates to 0 for M >= 1
            return 2.0 - (self.mantissa_bits == 0)
        return 2 - 2.0 ** -self.mantissa_bits

    def maxval(self, bias):
        """Largest magnitude at exponent bias `bias` (a float or tensor): (2 - 2^-M) * 2^(2^E - 1 - bias)."""
        if self.numerics == "reference":
            return self.clip_factor * _pow2(self.max_exponent_code - bias)
        return self.clip_factor * _exp2(self.max_exponent_code - bias)

    def step(self, exponent: torch.Tensor, bias: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        """2^(exponent - M - bias), the spacing of the binade `exponent` (consumes `exponent` in place);
        `offset`: bias + M, when computed beforehand (FPTerms)."""
        if self.numerics == "reference":
            return torch.pow(2.0, exponent.sub_(self.mantissa_bits).sub_(bias))
        return exponent.sub_(bias + self.mantissa_bits if offset is None else offset).exp2_()

    def bias_for_maxval(self, maxval):
        """The real exponent bias whose maxval equals `maxval` (the MinMax bias of a slice with that absmax)."""
        if torch.is_tensor(maxval):
            log_max = torch.log2(maxval.to(compute_dtype(maxval)).clamp_min(MIN_ABSMAX))
        else:
            log_max = math.log2(max(maxval, MIN_ABSMAX))
        return 2 ** self.exponent_bits - log_max + math.log2(self.clip_factor) - 1


E2M1 = FPFormat(2, 1)  # the 4-bit FP element of LLM-FP4's default, NVFP4 and MXFP4


def _exp2(x):
    return torch.exp2(x) if torch.is_tensor(x) else 2.0 ** x


def _pow2(x):
    return torch.pow(2.0, x) if torch.is_tensor(x) else 2.0 ** x


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32  # float64 only for exact tests


class FPTerms(NamedTuple):
    """What fp_quantize derives from the bias alone; a static quantizer computes them once, not per call."""

    bias: torch.Tensor
    neg_maxval: torch.Tensor
    maxval: torch.Tensor
    offset: torch.Tensor  # bias + M


def fp_terms(fmt: FPFormat, bias, dtype: torch.dtype, device=None) -> FPTerms:
    bias = bias.to(dtype) if torch.is_tensor(bias) else torch.tensor(bias, dtype=dtype, device=device)
    maxval = fmt.maxval(bias)
    return FPTerms(bias, -maxval, maxval, bias + fmt.mantissa_bits)


def fp_quantize(x: torch.Tensor, fmt: FPFormat, bias, terms: FPTerms | None = None) -> torch.Tensor:
    """Fake-quantize `x` to `fmt` with the (broadcastable, real-valued) exponent bias `bias`, or with its
    `terms` (fp_terms of the bias in compute_dtype(x), then `bias` is not read)."""
    if terms is None:
        terms = fp_terms(fmt, bias, compute_dtype(x), x.device)
    clipped = torch.clamp(x.to(terms.bias.dtype), terms.neg_maxval, terms.maxval)  # new: the ops below are in place
    # exponent floor(log2|x| + bias), at least 1 (log2(0) = -inf lands in the subnormal binade), then the
    # step 2^(exponent - M - bias) of that binade
    exponent = clipped.abs().log2_().add_(terms.bias).floor_().clamp_min_(1)
    step = fmt.step(exponent, terms.bias, terms.offset)
    return clipped.div_(step).round_().mul_(step)


def fp_encode(x: torch.Tensor, fmt: FPFormat, bias) -> torch.Tensor:
    """The int32 codes (sign, exponent field, mantissa: 1 + E + M bits, exponent field 0 = subnormal) of
    fp_quantize(x, fmt, bias). A value that rounds up out of the top binade has no code: the reference
    numerics' clip value, which the format does not have, is refused."""
    terms = fp_terms(fmt, bias, compute_dtype(x), x.device)
    clipped = torch.clamp(x.to(terms.bias.dtype), terms.neg_maxval, terms.maxval)
    exponent = clipped.abs().log2().add_(terms.bias).floor_().clamp_min_(1)
    steps = clipped.abs().div_(fmt.step(exponent.clone(), terms.bias, terms.offset)).round_()  # in binade steps
    implicit = 2 ** fmt.mantissa_bits
    carried = steps == 2 * implicit  # rounded up into the next binade: mantissa 0 there
    exponent = torch.where(carried, exponent + 1, exponent)
    steps = torch.where(carried, implicit, steps)
    if (exponent > fmt.max_exponent_code).any():
        raise ValueError(f"values beyond the largest {fmt.name} value have no code ({fmt.numerics} numerics)")
    normal = steps >= implicit
    field = torch.where(normal, exponent, 0).int()
    mantissa = (steps - normal * implicit).int()
    sign = torch.signbit(clipped).int()
    return (sign << (fmt.exponent_bits + fmt.mantissa_bits)) | (field << fmt.mantissa_bits) | mantissa


def fp_decode(codes: torch.Tensor, fmt: FPFormat, bias, dtype=torch.float32) -> torch.Tensor:
    """Values of fp_encode's codes at `bias`: (field ? 2^M + mantissa : mantissa) * 2^(max(field, 1) - M - bias).
    Equal to fp_quantize's values, except that a value fp_quantize rounded up across a binade edge may differ
    from this one in the last bit (the two compute the same power of two from different exponents)."""
    bias = bias.to(dtype) if torch.is_tensor(bias) else torch.tensor(bias, dtype=dtype, device=codes.device)
    codes = codes.long()
    mantissa = codes & (2 ** fmt.mantissa_bits - 1)
    field = (codes >> fmt.mantissa_bits) & fmt.max_exponent_code
    sign = codes >> (fmt.exponent_bits + fmt.mantissa_bits)
    steps = (mantissa + (field > 0) * 2 ** fmt.mantissa_bits).to(dtype)
    value = steps * fmt.step(field.clamp_min(1).to(dtype), bias)
    return torch.where(sign.bool(), -value, value)


def fp_grid(fmt: FPFormat, bias: float = 0.0) -> torch.Tensor:
    """All non-negative values of `fmt` at `bias`, sorted (0, subnormals, normals up to maxval; the reference
    numerics add their clip value 2 * 2^(2^E - 1 - bias), which the top binade rounds up to)."""
    m_steps = 2 ** fmt.mantissa_bits
    sub = [k * 2.0 ** (1 - fmt.mantissa_bits - bias) for k in range(m_steps)]
    normal = [2.0 ** (e - bias) * (1 + m / m_steps) for e in range(1, fmt.max_exponent_code + 1) for m in range(m_steps)]
    top = [fmt.maxval(bias)] if fmt.numerics == "reference" else []
    return torch.tensor(sorted(set(sub + normal + top)), dtype=torch.float64)


def fp_formats(bits: int, space: str = "paper", numerics: str = "paper") -> list[FPFormat]:
    """Candidate formats for a `bits`-wide search.

    "paper": every split with E >= 1 (the paper excludes only E0, i.e. INT).
    "reference": what the released code searches: at 8 bits only M in 2..6 (no E7M0/E6M1).
    """
    if space not in ("paper", "reference"):
        raise ValueError(f"format space must be 'paper' or 'reference', got {space!r}")
    formats = [FPFormat(bits - 1 - m, m, numerics) for m in range(bits - 1)]  # E from bits-1 down to 1
    if space == "reference" and bits == 8:
        formats = [f for f in formats if 2 <= f.mantissa_bits <= 6]
    return formats


def int_symmetric_scale(absmax: torch.Tensor, bits: int) -> torch.Tensor:
    return absmax.float().clamp_min(MIN_ABSMAX) / (2 ** (bits - 1) - 1)


def int_quantize_symmetric(x: torch.Tensor, bits: int, scale, full_range: bool = False) -> torch.Tensor:
    """Symmetric INT-q with levels -(2^(q-1)-1)..(2^(q-1)-1) times `scale`; `full_range` adds the most
    negative level -2^(q-1) (FlatQuant/QuaRot/GPTQ's convention, same scale absmax / (2^(q-1)-1))."""
    return int_symmetric_codes(x, bits, scale, full_range) * scale


def int_asymmetric_params(x_min: torch.Tensor, x_max: torch.Tensor, bits: int):
    """Scale and integer zero point covering [min(x_min, 0), max(x_max, 0)] with 2^q levels."""
    x_min, x_max = x_min.float().clamp(max=0), x_max.float().clamp(min=0)
    scale = (x_max - x_min).clamp_min(MIN_ABSMAX) / (2 ** bits - 1)
    return scale, torch.round(-x_min / scale)


def int_symmetric_codes(x: torch.Tensor, bits: int, scale, full_range: bool = False) -> torch.Tensor:
    """The integer levels of int_quantize_symmetric (its values are these times `scale`)."""
    q_max = 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(x.to(compute_dtype(x)) / scale), -q_max - full_range, q_max)


def int_asymmetric_codes(x: torch.Tensor, bits: int, scale, zero) -> torch.Tensor:
    """The codes 0..2^q-1 of int_quantize_asymmetric (its values are (codes - zero) * scale)."""
    return torch.clamp(torch.round(x.to(compute_dtype(x)) / scale) + zero, 0, 2 ** bits - 1)


def int_quantize_asymmetric(x: torch.Tensor, bits: int, scale, zero) -> torch.Tensor:
    return (int_asymmetric_codes(x, bits, scale, zero) - zero) * scale
