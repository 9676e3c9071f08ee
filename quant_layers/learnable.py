"""Dynamic fake quantizers with straight-through rounding and learnable clipping (FlatQuant, spec A.4).

A `DynamicQuantizer` derives its range from every group of its input at run time: one group per token
(activations), per row (weights), or `groupsize` consecutive channels (the KV cache). Rounding passes
gradients straight through, so clipping ratios, scales and the transforms in front are trainable.
Elements are INT (symmetric with levels -2^(b-1)..2^(b-1)-1 as FlatQuant/QuaRot, or asymmetric) or any ExMy
FP format, whose per-group maximum sets its exponent bias as LLM-FP4's MinMax does.

A `LearnableBlockQuantizer` is the same idea for the block-scaled formats (NVFP4, MX): its forward values are
`BlockQuantizer`'s bit for bit, and both the element rounding and the block-scale rounding (E4M3, E8M0) pass
gradients straight through, so a learned clip factor on the block maxima trains.
"""
from __future__ import annotations

import torch
from torch import nn

from .blocks import blocks_of, e4m3_scales, element_max, element_quantize, mx_exponent_offset, mx_scale_codes, \
    mx_scales, nvfp4_tensor_scale, tensor_scale_aim
from .formats import MIN_ABSMAX, FPFormat, fp_quantize
from .schemes import Scheme

CLIP_INIT = 4.0  # sigmoid(4) = 0.982: clipping starts just inside the observed range


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def straight_through(x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """`rounded` exactly in the forward pass (no x + (r - x) rounding error), the gradient of x backwards."""
    return rounded.detach() + (x - x.detach())


def _fp_ste(x: torch.Tensor, fmt: FPFormat, maxval: torch.Tensor) -> torch.Tensor:
    """FP fake quantization at maxval with a straight-through grid: Q_b(x) = 2^-b Q_0(2^b x), b from maxval."""
    scale = fmt.maxval(0.0) / maxval.clamp_min(MIN_ABSMAX)  # 2^b
    scaled = torch.clamp(x * scale, -fmt.maxval(0.0), fmt.maxval(0.0))
    grid = fp_quantize(scaled.detach(), fmt, 0.0)
    return (scaled + (grid - scaled.detach())) / scale


class DynamicQuantizer(nn.Module):
    """Per-group dynamic INT or FP fake quantization, with optional learnable clipping (LAC / LWC).

    `element` is an int bit width or an FPFormat. `clip`: None (no clipping), "scalar" (one max and one min
    ratio shared by every group: FlatQuant's LAC) or an int number of groups along the first dimension
    (one ratio per weight row: LWC). Ratios are sigmoid(parameter), starting at sigmoid(4).
    """

    def __init__(self, element, symmetric: bool = True, groupsize: int = -1, clip=None):
        super().__init__()
        if isinstance(element, int) and not 2 <= element <= 16:
            raise ValueError(f"INT bits must be in 2..16, got {element}")
        self.element, self.symmetric, self.groupsize = element, symmetric, groupsize
        shape = () if clip == "scalar" else (clip, 1)
        self.clip_max = nn.Parameter(torch.full(shape, CLIP_INIT)) if clip is not None else None
        self.clip_min = nn.Parameter(torch.full(shape, CLIP_INIT)) if clip is not None and not symmetric else None

    @property
    def is_fp(self) -> bool:
        return isinstance(self.element, FPFormat)

    def _groups(self, x):
        if self.groupsize <= 0 or self.groupsize == x.shape[-1]:
            return x
        if x.shape[-1] % self.groupsize:
            raise ValueError(f"group size {self.groupsize} does not divide the last dimension {x.shape[-1]}")
        return x.reshape(*x.shape[:-1], x.shape[-1] // self.groupsize, self.groupsize)

    def _ratio(self, param, x):
        if param is None:
            return 1.0
        ratio = torch.sigmoid(param)
        return ratio.reshape(ratio.shape + (1,) * (x.dim() - ratio.dim())) if ratio.dim() else ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = self._groups(x.float())
        if self.symmetric or self.is_fp:
            top = groups.abs().amax(-1, keepdim=True) * self._ratio(self.clip_max, groups)
            out = self._symmetric(groups, top)
        else:
            high = groups.amax(-1, keepdim=True).clamp_min(0) * self._ratio(self.clip_max, groups)
            low = groups.amin(-1, keepdim=True).clamp_max(0) * self._ratio(self.clip_min, groups)
            scale = (high - low).clamp_min(MIN_ABSMAX) / (2 ** self.element - 1)
            zero = round_ste(-low / scale)
            codes = torch.clamp(round_ste(groups / scale) + zero, 0, 2 ** self.element - 1)
            out = (codes - zero) * scale
        return out.reshape(x.shape).to(x.dtype)

    def _symmetric(self, groups, top):
        if self.is_fp:
            return _fp_ste(groups, self.element, top)
        q_max = 2 ** (self.element - 1) - 1
        scale = top.clamp_min(MIN_ABSMAX) / q_max
        return torch.clamp(round_ste(groups / scale), -q_max - 1, q_max) * scale

    def extra_repr(self) -> str:
        element = self.element.name if self.is_fp else f"INT{self.element} {'sym' if self.symmetric else 'asym'}"
        group = "per group of the last dim" if self.groupsize <= 0 else f"groups of {self.groupsize}"
        return f"{element}, dynamic, {group}, learnable clip={self.clip_max is not None}"


class WeightClip(nn.Module):
    """Learnable per-row clipping of a weight (LWC): rows clamped to [min_r sigmoid(c_min), max_r sigmoid(c_max)]."""

    def __init__(self, rows: int):
        super().__init__()
        self.clip_max = nn.Parameter(torch.full((rows, 1), CLIP_INIT))
        self.clip_min = nn.Parameter(torch.full((rows, 1), CLIP_INIT))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        high = w.amax(-1, keepdim=True) * torch.sigmoid(self.clip_max).to(w.dtype)
        low = w.amin(-1, keepdim=True) * torch.sigmoid(self.clip_min).to(w.dtype)
        return torch.maximum(torch.minimum(w, high), low)


class LearnableBlockQuantizer(nn.Module):
    """Training-time fake quantization to a block-scaled format (`scheme`: NVFP4, MXFP4, ...), recomputed from
    every input: block scales from the blocks' maxima times an optional learnable clip ratio, rounded to E4M3 (times
    an FP32 tensor scale taken from the input itself) or to a power of two (E8M0) as the engines do it.

    `clip`: None, "scalar" (one ratio for every block: LAC) or an int number of rows (one ratio per weight row:
    LWC; the deployed weight quantizer then takes sigmoid(clip_max) as its clip factor). With the scheme's
    `four_over_six` (NVFP4 inputs) each block takes the 6- or 4-mapping that errs less, as BlockQuantizer does.
    `batch_max`: the maximum of a batch that data-parallel workers share (the NVFP4 tensor scale is the batch's).
    """

    def __init__(self, scheme: Scheme, clip=None, batch_max=None):
        super().__init__()
        self.batch_max = batch_max or (lambda amax: amax)
        if scheme.granularity != "group" or scheme.scale not in ("e4m3", "e8m0"):
            raise ValueError(f"{scheme.name} is not a block-scaled format")
        self.fmt, self.block_size, self.encoding, self.rule = scheme.element, scheme.group_size, scheme.scale, scheme.rule
        self.four_over_six = scheme.four_over_six
        shape = () if clip == "scalar" else (clip, 1)
        self.clip_max = nn.Parameter(torch.full(shape, CLIP_INIT)) if clip is not None else None

    def clip_factor(self) -> torch.Tensor | None:
        return None if self.clip_max is None else torch.sigmoid(self.clip_max)

    def step(self, blocks: torch.Tensor, divisor: float | None = None) -> torch.Tensor:
        """Each block's quantization step [..., n / block_size, 1], its value the engines' (rounded) one; NVFP4's
        maps the block maximum to `divisor` (default the element's largest value, 6)."""
        clip = self.clip_factor()
        amax = blocks.abs().amax(-1)
        target = amax if clip is None else amax * clip
        if self.encoding == "e8m0":
            rounded = mx_scales(mx_scale_codes(target.detach(), self.fmt, self.rule))
            step = straight_through(target / 2 ** mx_exponent_offset(self.fmt), rounded)
        else:
            tensor_scale = nvfp4_tensor_scale(self.batch_max(blocks.detach().abs().amax()),
                                              tensor_scale_aim(self.four_over_six), self.fmt)
            rounded = e4m3_scales(amax.detach(), tensor_scale, self.fmt, None if clip is None else clip.detach(), divisor)
            step = straight_through(tensor_scale * target / (divisor or element_max(self.fmt)), rounded) / tensor_scale
        return step.unsqueeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = blocks_of(x.float(), self.block_size)
        if not self.four_over_six:
            return self.quantize(blocks, self.step(blocks)).to(x.dtype).flatten(-2)
        six, four = (self.quantize(blocks, self.step(blocks, divisor)) for divisor in (None, 4.0))
        error = [(q.detach() - blocks.detach()).square().sum(-1, keepdim=True) for q in (four, six)]
        return torch.where(error[0] < error[1], four, six).to(x.dtype).flatten(-2)

    def quantize(self, blocks: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        top = element_max(self.fmt)
        scaled = torch.clamp(blocks / step, -top, top)  # clipped values send their gradient to the scale
        return straight_through(scaled, element_quantize(scaled.detach(), self.fmt)) * step

    def extra_repr(self) -> str:
        return (f"{self.fmt.name}, blocks of {self.block_size}, {self.encoding}, straight-through, "
                f"learnable clip={self.clip_max is not None}")
