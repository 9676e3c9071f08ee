"""Block-scaled formats: one scale per block of consecutive elements along the reduction (last) dimension.

- OCP microscaling (MXFP4, MXFP6, MXFP8): blocks of 32, the scale a power of two stored as E8M0 (uint8 code c,
  value 2^(c - 127)).
- NVFP4: E2M1 elements in blocks of 16, the scale an FP8 E4M3 value s times one FP32 tensor scale g, value
  q * s / g (compressed-tensors' convention: g = 448 * 6 / amax(tensor) is a multiplier).

The numbers are the ones compressed-tensors computes (what llm-compressor writes and vLLM reads), operation by
operation, so that they agree bit for bit: an E4M3 block scale is e4m3(g * (amax / 6)) clamped to +-448, a zero
one becomes 0.125 (compressed-tensors' stand-in for a scale that rounded to zero); a value is quantized as
element(clamp(x / (s / g))) * (s / g). Elements are the OCP ones at their standard bias: E2M1, E2M3 and E3M2 have
no special values, E4M3 is the "fn" variant (largest 448), E5M2 keeps IEEE infinities (largest 57344).

Beyond the plain absmax scale (RTN), a block's scale may be computed from `clip * amax / divisor`: `clip` (the
LLM-FP4 search's gamma, per row or per block) shrinks the range, and `divisor` 4 instead of the element's largest
value 6 maps the block maximum to 4 (NVFP4 "four over six"). Both only change the stored scale, so every such
quantizer is still the format the engines read. NVFP4 inputs may choose four over six too, block by block as they
are quantized at run time: the scale is still an E4M3 one, but computing it takes a kernel that compares both
(the engines' stock kernels map every block to 6).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .formats import FPFormat, fp_decode, fp_encode
from .schemes import Scheme, register_scale

ENCODINGS = ("e8m0", "e4m3")  # the block scale: power of two (MX); FP8 E4M3 times an FP32 tensor scale (NVFP4)
MX_RULES = ("even", "floor", "ceil")
E4M3_MAX = 448.0
E4M3_ZERO_SCALE = 0.125  # what compressed-tensors stores for an E4M3 block scale that is zero
# Four over six maps some blocks' maximum to 4, i.e. scales 1.5x the usual one; the tensor scale then aims the
# largest block at 256 instead of 448 so that no such scale saturates E4M3 (the fouroversix recipe).
FOUR_OVER_SIX_E4M3_MAX = 256.0
E8M0_BIAS = 127
# the largest finite value where the OCP element differs from "every code is a number"
SPECIAL_MAX = {(4, 3): 448.0, (5, 2): 57344.0}


def ocp_bias(fmt: FPFormat) -> int:
    return 2 ** (fmt.exponent_bits - 1) - 1


def element_max(fmt: FPFormat) -> float:
    return SPECIAL_MAX.get((fmt.exponent_bits, fmt.mantissa_bits), fmt.maxval(ocp_bias(fmt)))


def element_quantize(x: torch.Tensor, fmt: FPFormat) -> torch.Tensor:
    """x rounded to the OCP element `fmt` (half to even, saturating at its largest value), in float32.

    fp_quantize's arithmetic for an integer bias b: the step of x's binade, 2^(max(floor(log2|x|), 1 - b) - M),
    with floor(log2|x|) read off the float32 exponent field and the step built from its bits. Both are exact, and
    they avoid a log2 and an exp2 per element, which cost milliseconds on small tensors (GPTQ's columns) when
    the library's threads compete for the cores."""
    top, bias = element_max(fmt), ocp_bias(fmt)
    clipped = x.float().clamp(-top, top)
    exponent = ((clipped.view(torch.int32) >> 23) & 0xFF) - 127  # subnormals and 0 give -127: below 1 - b anyway
    step = ((exponent.clamp_min_(1 - bias) + (127 - fmt.mantissa_bits)) << 23).view(torch.float32)
    return clipped.div_(step).round_().mul_(step)


def mx_exponent_offset(fmt: FPFormat) -> int:
    """floor(log2(largest element value)): the exponent that a block maximum's exponent maps to."""
    return math.floor(math.log2(element_max(fmt)))


def round_mantissa_half_up(x: torch.Tensor, mantissa_bits: int) -> torch.Tensor:
    """x with its mantissa rounded (half up, on the bit pattern) to `mantissa_bits` bits and then dropped: the
    power of two nearest to x at that precision. Works on the bits of x's own float type."""
    width, int_type = {torch.float32: (23, torch.int32), torch.bfloat16: (7, torch.int16),
                       torch.float16: (10, torch.int16)}[x.dtype]
    bits = x.view(int_type).to(torch.int32)
    exponent_mask = ~((1 << width) - 1)
    rounded = (bits + (1 << (width - mantissa_bits - 1))) & exponent_mask
    return rounded.to(int_type).view(x.dtype)


def mx_scale_codes(amax: torch.Tensor, fmt: FPFormat, rule: str = "even") -> torch.Tensor:
    """E8M0 codes (0..254, float32) of blocks with maximum `amax`.

    "floor" (OCP): 2^(floor(log2 amax) - offset), which may clip the block's top values. "even"
    (compressed-tensors): amax first rounded to the element's precision, then floor, so a maximum that would round
    past the element's top moves to the next power of two; compressed-tensors rounds at E2M3's mantissa width for
    E2M3 and at E2M1's for every other element, which this follows. "ceil": the smallest power of two that
    clips nothing, 2^ceil(log2(amax / largest element)).
    """
    offset = mx_exponent_offset(fmt)
    if rule in ("floor", "ceil"):
        # floor(log2 amax) read off the float's own exponent: float32 log2 rounds a value just below 2^k to k
        # (and then floor gives k), and a ratio just above 2^k to 2^k (and then ceil clips the block maximum)
        mantissa, binade = torch.frexp(amax.float())  # amax = mantissa * 2^binade, mantissa in [0.5, 1)
        exponent = torch.where(amax > 0, binade - 1 - offset, -math.inf)  # zero: code 0
        exponent = torch.where(amax.isinf(), math.inf, exponent)  # infinite: the top code, as "even" gives
        if rule == "ceil":  # at 2^exponent the block maximum is 2 * mantissa * 2^offset: past the top, one more
            exponent = exponent + (2 * mantissa * 2 ** offset > element_max(fmt))
    elif rule == "even":
        width = 3 if (fmt.exponent_bits, fmt.mantissa_bits) == (2, 3) else 1
        exponent = torch.floor(torch.log2(round_mantissa_half_up(amax, width))) - offset
    else:
        raise ValueError(f"unknown E8M0 scale rule {rule!r}; choose from {MX_RULES}")
    return (E8M0_BIAS + exponent).float().clamp(0, 254).round()  # log2(0) = -inf: a zero block gets code 0


def mx_scales(codes: torch.Tensor) -> torch.Tensor:
    return torch.exp2(codes.float() - E8M0_BIAS)


def nvfp4_tensor_scale(amax: torch.Tensor, e4m3_max: float = E4M3_MAX, fmt: FPFormat = FPFormat(2, 1)) -> torch.Tensor:
    """The FP32 tensor scale g = e4m3_max * (largest element) / amax; 1 where amax is not finite. Computed in
    amax's own type and then stored as float32, as compressed-tensors' generate_gparam does with the observed
    tensor's minimum and maximum (in bfloat16 for a bfloat16 model: a float32 division differs there)."""
    amax = amax.clamp(min=torch.finfo(amax.dtype).tiny)
    return torch.nan_to_num(e4m3_max * element_max(fmt) / amax, nan=1.0, posinf=1.0, neginf=1.0).float()


def e4m3_scales(amax: torch.Tensor, tensor_scale: torch.Tensor, fmt: FPFormat = FPFormat(2, 1),
                clip: torch.Tensor | None = None, divisor: torch.Tensor | float | None = None) -> torch.Tensor:
    """E4M3 block scales (as float32 values) of blocks with maximum `amax`: e4m3(g * (amax / 6)), or with
    e4m3(g * (clip * amax / divisor)) when a clip factor or another divisor is given."""
    target = amax if clip is None else amax * clip
    local = target / (element_max(fmt) if divisor is None else divisor)
    # in float32 even for bfloat16 maxima: a 0-d float32 tensor scale times them would stay bfloat16 (and round
    # once more), where compressed-tensors multiplies by its [1]-shaped float32 global scale
    scales = (tensor_scale * local.float()).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()
    return torch.where(scales == 0, E4M3_ZERO_SCALE, scales)


def tensor_scale_aim(four_over_six: bool) -> float:
    """The E4M3 value the largest block's scale is aimed at by the tensor scale."""
    return FOUR_OVER_SIX_E4M3_MAX if four_over_six else E4M3_MAX


def four_or_six(blocks: torch.Tensor, tensor_scale: torch.Tensor, fmt: FPFormat, clip=None,
                weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(each block's E4M3 scale [..., n / block_size], the blocks quantized with it) of `blocks` [..., n /
    block_size, block_size]: the scale that maps a block's (clipped) maximum to 6 or the one that maps it to 4,
    whichever gives the lower squared error (each element's error times `weight`, broadcastable to blocks; a tie
    keeps 6)."""
    amax = block_amax(blocks)
    scales, quantized, errors = [], [], []
    for divisor in (None, 4.0):
        scales.append(e4m3_scales(amax, tensor_scale, fmt, clip, divisor))
        step = BlockQuantizer.step(scales[-1], tensor_scale)
        quantized.append((element_quantize(blocks / step, fmt) * step).to(blocks.dtype))
        squared = (quantized[-1] - blocks).square()
        errors.append((squared if weight is None else squared * weight).sum(-1))
    four = errors[1] < errors[0]
    return torch.where(four, scales[1], scales[0]), torch.where(four[..., None], quantized[1], quantized[0])


def blocks_of(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """x [..., n] as [..., n / block_size, block_size]."""
    if x.shape[-1] % block_size:
        raise ValueError(f"block size {block_size} does not divide the last dimension {x.shape[-1]}")
    return x.unflatten(-1, (x.shape[-1] // block_size, block_size))


def block_amax(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.detach().abs().amax(-1)


class BlockQuantizer(nn.Module):
    """Fake quantization to `fmt` with one scale per block of `block_size` elements of the last dimension.

    Static (weights): `scale` [..., n / block_size] holds each block's scale value (a power of two for E8M0, an
    E4M3 value for NVFP4). Dynamic (activations): block scales come from each input's blocks at run time, as the
    engines compute them; NVFP4's tensor scale is then the calibrated `tensor_scale` (static, llm-compressor's
    default) or, without one, the input's own (dynamic); with `four_over_six` each NVFP4 input block takes the
    6- or the 4-mapping, whichever errs less (four_or_six).
    """

    def __init__(self, fmt: FPFormat, block_size: int, encoding: str, scale: torch.Tensor | None = None,
                 tensor_scale: torch.Tensor | None = None, dynamic: bool = False, rule: str = "even",
                 four_over_six: bool = False):
        super().__init__()
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown block scale encoding {encoding!r}; choose from {ENCODINGS}")
        if encoding == "e8m0" and rule not in MX_RULES:
            raise ValueError(f"unknown E8M0 scale rule {rule!r}; choose from {MX_RULES}")
        if not dynamic and scale is None:
            raise ValueError("a static block quantizer needs its block scales")
        if four_over_six and not (dynamic and encoding == "e4m3"):
            raise ValueError("a quantizer chooses four over six at run time for dynamic E4M3 blocks only")
        self.fmt, self.block_size, self.encoding = fmt, block_size, encoding
        self.dynamic, self.rule, self.four_over_six = dynamic, rule if encoding == "e8m0" else "", four_over_six
        self.register_buffer("scale", None if scale is None else scale.float())
        # a copy: fused layers are built from one shared tensor scale, but each quantizer owns (and saves) its own
        self.register_buffer("tensor_scale", None if tensor_scale is None else tensor_scale.float().reshape(()).clone())

    @classmethod
    def from_tensor(cls, x: torch.Tensor, fmt: FPFormat, block_size: int, encoding: str, *,
                    tensor_scale: torch.Tensor | None = None, clip=None, divisor=None, rule: str = "even"):
        """Static block scales of x [rows, n]: absmax (RTN) unless a clip factor (broadcastable to the block
        maxima [rows, n / block_size]) or a divisor is given. NVFP4's tensor scale defaults to x's own."""
        amax = block_amax(blocks_of(x, block_size))
        if encoding == "e8m0":
            target = amax if clip is None else amax * clip
            if divisor is not None:
                raise ValueError("a block divisor (four over six) applies to NVFP4's E4M3 scales, not to E8M0")
            return cls(fmt, block_size, encoding, mx_scales(mx_scale_codes(target, fmt, rule)), rule=rule)
        if tensor_scale is None:
            tensor_scale = nvfp4_tensor_scale(x.detach().abs().amax(), fmt=fmt)
        return cls(fmt, block_size, encoding, e4m3_scales(amax, tensor_scale, fmt, clip, divisor), tensor_scale)

    @classmethod
    def four_over_six(cls, x: torch.Tensor, fmt: FPFormat, block_size: int, *, tensor_scale=None, clip=None,
                      importance: torch.Tensor | None = None) -> "BlockQuantizer":
        """NVFP4 "four over six": each block's scale maps its maximum to 6 or to 4, whichever gives the lower
        squared error (weighted per input channel by `importance`, e.g. the inputs' mean square). The default
        tensor scale aims at 256 so that no 4-mapped scale saturates E4M3."""
        if tensor_scale is None:
            tensor_scale = nvfp4_tensor_scale(x.detach().abs().amax(), FOUR_OVER_SIX_E4M3_MAX, fmt)
        weight = None if importance is None else blocks_of(importance, block_size)
        scale, _ = four_or_six(blocks_of(x.detach(), block_size), tensor_scale, fmt, clip, weight)
        return cls(fmt, block_size, "e4m3", scale, tensor_scale)

    def tensor_scale_of(self, blocks: torch.Tensor) -> torch.Tensor | None:
        """NVFP4's tensor scale for `blocks`: the calibrated one, else their own; None for E8M0 scales."""
        if self.encoding != "e4m3":
            return None
        if self.tensor_scale is not None:
            return self.tensor_scale
        return nvfp4_tensor_scale(blocks.detach().abs().amax(), tensor_scale_aim(self.four_over_six), self.fmt)

    def scales(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(each block's stored scale value [..., n / block_size], NVFP4's tensor scale or None) for `blocks`."""
        tensor_scale = self.tensor_scale_of(blocks)
        if not self.dynamic:
            return self.scale, tensor_scale
        if self.encoding == "e8m0":
            return mx_scales(mx_scale_codes(block_amax(blocks), self.fmt, self.rule)), None
        if self.four_over_six:
            return four_or_six(blocks.detach(), tensor_scale, self.fmt)[0], tensor_scale
        return e4m3_scales(block_amax(blocks), tensor_scale, self.fmt), tensor_scale

    @staticmethod
    def step(scale: torch.Tensor, tensor_scale: torch.Tensor | None) -> torch.Tensor:
        """The value of element 1 in each block, [..., n / block_size, 1] (s / g as compressed-tensors divides)."""
        return (scale if tensor_scale is None else scale / tensor_scale).unsqueeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = blocks_of(x, self.block_size)
        if self.four_over_six:  # choosing each block's mapping quantized it both ways already
            return four_or_six(blocks, self.tensor_scale_of(blocks), self.fmt)[1].flatten(-2)
        step = self.step(*self.scales(blocks))
        # flatten, not reshape(x.shape): scales with leading candidate dimensions broadcast over x (the search)
        return (element_quantize(blocks / step, self.fmt) * step).to(x.dtype).flatten(-2)

    def spec(self) -> Scheme:
        tensor_scale = "" if self.encoding == "e8m0" else "static" if self.tensor_scale is not None else "dynamic"
        return Scheme(self.fmt, "group", self.block_size, self.encoding, self.dynamic, self.rule, tensor_scale,
                      self.four_over_six)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(int32 element codes shaped as x, {"scale": block scale values[, "tensor_scale"]}); decode() of them
        equals self(x) bit for bit."""
        blocks = blocks_of(x, self.block_size)
        scale, tensor_scale = self.scales(blocks)
        top = element_max(self.fmt)
        scaled = (blocks / self.step(scale, tensor_scale)).float().clamp(-top, top)
        codes = fp_encode(scaled, self.fmt, ocp_bias(self.fmt)).reshape(x.shape)
        return codes, {"scale": scale} if tensor_scale is None else {"scale": scale, "tensor_scale": tensor_scale}

    def decode(self, codes: torch.Tensor, ranges: dict) -> torch.Tensor:
        values = fp_decode(blocks_of(codes, self.block_size), self.fmt, ocp_bias(self.fmt))
        return (values * self.step(ranges["scale"], ranges.get("tensor_scale"))).reshape(codes.shape)

    def extra_repr(self) -> str:
        kind = ("dynamic" + ", four over six" * self.four_over_six) if self.dynamic else f"scales {tuple(self.scale.shape)}"
        return f"{self.fmt.name}, blocks of {self.block_size}, {self.encoding} ({self.rule if self.encoding == 'e8m0' else 'x fp32'}), {kind}"


def _build(scheme: Scheme, x):
    """RTN block scales of a static x; for dynamic inputs NVFP4's calibrated tensor scale from x's maximum."""
    fmt, size = scheme.element, scheme.group_size
    if not scheme.dynamic:
        return BlockQuantizer.from_tensor(x, fmt, size, scheme.scale, rule=scheme.rule)
    tensor_scale = None
    if scheme.tensor_scale == "static":
        if x is None:
            raise ValueError(f"{scheme.name} inputs need calibration inputs for their static tensor scale")
        tensor_scale = nvfp4_tensor_scale(x.detach().abs().amax(), tensor_scale_aim(scheme.four_over_six), fmt)
    return BlockQuantizer(fmt, size, scheme.scale, tensor_scale=tensor_scale, dynamic=True, rule=scheme.rule,
                          four_over_six=scheme.four_over_six)


register_scale("e8m0", FPFormat, _build)
register_scale("e4m3", FPFormat, _build)
