"""Fake-quantizer modules: a format plus the bias/scale buffers that calibration fills in.

A quantizer is static (its buffers are fixed after calibration) unless `dynamic` is set, in which case
it derives a per-token range from each row of its input at run time.
"""
from __future__ import annotations

import torch
from torch import nn

from .formats import (FPFormat, fp_quantize, int_asymmetric_params, int_quantize_asymmetric,
                      int_quantize_symmetric, int_symmetric_scale)

GRANULARITIES = ("tensor", "row", "channel", "token")


def absmax(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """|x| maximum per tensor (0-d), per row ([rows, 1]), per last-dim channel ([channels]) or per token."""
    a = x.detach().abs().float()
    if granularity == "tensor":
        return a.amax()
    if granularity == "row":
        return a.reshape(a.shape[0], -1).amax(1, keepdim=True)
    if granularity == "channel":
        return a.reshape(-1, a.shape[-1]).amax(0)
    if granularity == "token":
        return a.amax(-1, keepdim=True)
    raise ValueError(f"unknown granularity {granularity!r}; choose from {GRANULARITIES}")


class FPQuantizer(nn.Module):
    """ExMy fake quantization with a real exponent bias of any broadcastable shape."""

    def __init__(self, fmt: FPFormat, bias: torch.Tensor | None = None, dynamic: bool = False):
        super().__init__()
        self.fmt = fmt
        self.dynamic = dynamic
        self.register_buffer("bias", None if bias is None else bias.float())

    @classmethod
    def minmax(cls, x: torch.Tensor, fmt: FPFormat, granularity: str) -> "FPQuantizer":
        if granularity == "token":
            return cls(fmt, dynamic=True)
        return cls(fmt, fmt.bias_for_maxval(absmax(x, granularity)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.fmt.bias_for_maxval(absmax(x, "token")) if self.dynamic else self.bias
        return fp_quantize(x, self.fmt, bias).to(x.dtype)

    def extra_repr(self) -> str:
        shape = "dynamic per-token" if self.dynamic else f"bias {tuple(self.bias.shape)}"
        return f"{self.fmt.name}, {shape}"


class IntQuantizer(nn.Module):
    """Symmetric or asymmetric INT-q with per-tensor/row/channel scales, or dynamic per token.
    `full_range`: symmetric levels reach -2^(q-1) too (see int_quantize_symmetric)."""

    def __init__(self, bits: int, symmetric: bool = True, scale=None, zero=None, dynamic: bool = False,
                 full_range: bool = False):
        super().__init__()
        if not 2 <= bits <= 16:
            raise ValueError(f"INT bits must be in 2..16, got {bits}")
        self.bits, self.symmetric, self.dynamic, self.full_range = bits, symmetric, dynamic, full_range
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)

    @classmethod
    def minmax(cls, x: torch.Tensor, bits: int, granularity: str, symmetric: bool = True,
               full_range: bool = False) -> "IntQuantizer":
        if granularity == "token":
            return cls(bits, symmetric, dynamic=True, full_range=full_range)
        return cls(bits, symmetric, *cls._params(x, bits, granularity, symmetric), full_range=full_range)

    @staticmethod
    def _params(x, bits, granularity, symmetric):
        if symmetric:
            return int_symmetric_scale(absmax(x, granularity), bits), None
        dims = {"tensor": None, "row": tuple(range(1, x.dim())), "channel": tuple(range(x.dim() - 1)),
                "token": (-1,)}[granularity]
        keep = granularity != "tensor"
        x = x.detach().float()
        x_min = x.amin(dim=dims, keepdim=keep) if dims else x.amin()
        x_max = x.amax(dim=dims, keepdim=keep) if dims else x.amax()
        if granularity == "channel":
            x_min, x_max = x_min.reshape(-1), x_max.reshape(-1)
        return int_asymmetric_params(x_min, x_max, bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero = (self._params(x, self.bits, "token", self.symmetric) if self.dynamic
                       else (self.scale, self.zero))
        if self.symmetric:
            return int_quantize_symmetric(x, self.bits, scale, self.full_range).to(x.dtype)
        return int_quantize_asymmetric(x, self.bits, scale, zero).to(x.dtype)

    def extra_repr(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        return f"INT{self.bits} {kind}" + (", dynamic per-token" if self.dynamic else "")


def quantizer_to_state(q: nn.Module) -> tuple[dict, dict]:
    """(JSON-able description, tensors) that `quantizer_from_state` turns back into the same quantizer."""
    if isinstance(q, FPQuantizer):
        spec = {"kind": "fp", "exponent_bits": q.fmt.exponent_bits, "mantissa_bits": q.fmt.mantissa_bits,
                "dynamic": q.dynamic}
        if q.fmt.numerics != "paper":  # files written before the setting existed hold paper numerics
            spec["numerics"] = q.fmt.numerics
        return spec, ({} if q.bias is None else {"bias": q.bias})
    if isinstance(q, IntQuantizer):
        spec = {"kind": "int", "bits": q.bits, "symmetric": q.symmetric, "dynamic": q.dynamic,
                "full_range": q.full_range}
        return spec, {k: v for k, v in (("scale", q.scale), ("zero", q.zero)) if v is not None}
    raise TypeError(f"cannot serialise quantizer {type(q).__name__}")


def quantizer_from_state(spec: dict, tensors: dict) -> nn.Module:
    if spec["kind"] == "fp":
        fmt = FPFormat(spec["exponent_bits"], spec["mantissa_bits"], spec.get("numerics", "paper"))
        return FPQuantizer(fmt, tensors.get("bias"), spec["dynamic"])
    if spec["kind"] == "int":
        return IntQuantizer(spec["bits"], spec["symmetric"], tensors.get("scale"), tensors.get("zero"),
                            spec["dynamic"], spec.get("full_range", False))
    raise ValueError(f"unknown quantizer kind {spec['kind']!r}")
