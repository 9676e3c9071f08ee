"""Fake-quantizer modules: a format plus the bias/scale buffers that calibration fills in.

A quantizer is static (its buffers are fixed after calibration) unless `dynamic` is set, in which case
it derives a per-token (or per token x group) range from its input at run time. Every quantizer says what
it is (`spec()`: a Scheme) and gives integer codes and the range tensors (`encode`), which `decode` turns back
into the fake-quantized values, so an exporter never has to reverse-engineer a tensor.
"""
from __future__ import annotations

import torch
from torch import nn

from .blocks import BlockQuantizer
from .formats import (FPFormat, compute_dtype, fp_decode, fp_encode, fp_quantize, fp_terms, int_asymmetric_codes,
                      int_asymmetric_params, int_quantize_asymmetric, int_quantize_symmetric, int_symmetric_codes,
                      int_symmetric_scale)
from .schemes import GRANULARITIES, IntElement, Scheme, register_scale


def grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [..., n] viewed as [..., n / group_size, group_size] (x itself when group_size is 0)."""
    if not group_size:
        return x
    if x.shape[-1] % group_size:
        raise ValueError(f"group size {group_size} does not divide the last dimension {x.shape[-1]}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def granularity_of(range_tensor: torch.Tensor | None, dynamic: bool, group_size: int) -> str:
    """The granularity a static range tensor's shape stands for (see absmax)."""
    if group_size:
        return "group"
    if dynamic:
        return "token"
    if range_tensor.dim() == 0:
        return "tensor"
    return "channel" if range_tensor.dim() == 1 else "row"


def absmax(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """|x| maximum per tensor (0-d), per row ([rows, 1]), per last-dim channel ([channels]), per token, or per
    group of an already `grouped` tensor (the same as per token: over the last dimension)."""
    a = x.detach().abs().float()
    if granularity == "tensor":
        return a.amax()
    if granularity == "row":
        return a.reshape(a.shape[0], -1).amax(1, keepdim=True)
    if granularity == "channel":
        return a.reshape(-1, a.shape[-1]).amax(0)
    if granularity in ("token", "group"):
        return a.amax(-1, keepdim=True)
    raise ValueError(f"unknown granularity {granularity!r}; choose from {GRANULARITIES}")


class FPQuantizer(nn.Module):
    """ExMy fake quantization with a real exponent bias of any broadcastable shape."""

    def __init__(self, fmt: FPFormat, bias: torch.Tensor | None = None, dynamic: bool = False, group_size: int = 0):
        super().__init__()
        self.fmt = fmt
        self.dynamic = dynamic
        self.group_size = group_size  # > 0: one bias per group of the last dimension ([..., n / g, 1])
        self.register_buffer("bias", None if bias is None else bias.float())
        self._terms_of = None  # (bias, its version, dtype, FPTerms): fp_terms of the static bias, kept between calls

    @classmethod
    def minmax(cls, x: torch.Tensor, fmt: FPFormat, granularity: str, group_size: int = 0) -> "FPQuantizer":
        if granularity == "token" or (granularity == "group" and x is None):
            return cls(fmt, dynamic=True, group_size=group_size)
        return cls(fmt, fmt.bias_for_maxval(absmax(grouped(x, group_size), granularity)), group_size=group_size)

    def _bias(self, groups: torch.Tensor) -> torch.Tensor:
        return self.fmt.bias_for_maxval(absmax(groups, "token")) if self.dynamic else self.bias

    def _static_terms(self, dtype: torch.dtype):
        """The static bias's fp_terms, recomputed only when the bias is replaced or changed in place (its version
        counter); None for a bias made under inference mode, which has no version counter."""
        bias = self.bias
        if bias.is_inference():
            return None
        kept = self._terms_of
        if kept is None or kept[0] is not bias or kept[1] != bias._version or kept[2] != dtype:
            kept = self._terms_of = (bias, bias._version, dtype, fp_terms(self.fmt, bias, dtype))
        return kept[3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = grouped(x, self.group_size)
        terms = None if self.dynamic else self._static_terms(compute_dtype(x))
        return fp_quantize(groups, self.fmt, self._bias(groups), terms).to(x.dtype).reshape(x.shape)

    def spec(self) -> Scheme:
        return Scheme(self.fmt, granularity_of(self.bias, self.dynamic, self.group_size), self.group_size,
                      dynamic=self.dynamic)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(codes shaped as x, {"bias": the exponent bias}) with decode(codes, ranges) == self(x) (see fp_decode)."""
        groups = grouped(x, self.group_size)
        bias = self._bias(groups)
        return fp_encode(groups, self.fmt, bias).reshape(x.shape), {"bias": bias}

    def decode(self, codes: torch.Tensor, ranges: dict) -> torch.Tensor:
        groups = grouped(codes, self.group_size)
        return fp_decode(groups, self.fmt, ranges["bias"]).reshape(codes.shape)

    def extra_repr(self) -> str:
        shape = "dynamic per-token" if self.dynamic else f"bias {tuple(self.bias.shape)}"
        return f"{self.fmt.name}, {shape}" + (f", groups of {self.group_size}" if self.group_size else "")


class IntQuantizer(nn.Module):
    """Symmetric or asymmetric INT-q with per-tensor/row/channel/group scales, or dynamic per token (x group).
    `full_range`: symmetric levels reach -2^(q-1) too (see int_quantize_symmetric)."""

    def __init__(self, bits: int, symmetric: bool = True, scale=None, zero=None, dynamic: bool = False,
                 full_range: bool = False, group_size: int = 0):
        super().__init__()
        self.element = IntElement(bits, symmetric, full_range)  # validates the bits
        self.bits, self.symmetric, self.dynamic, self.full_range = bits, symmetric, dynamic, full_range
        self.group_size = group_size
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)

    @classmethod
    def minmax(cls, x: torch.Tensor, bits: int, granularity: str, symmetric: bool = True,
               full_range: bool = False, group_size: int = 0) -> "IntQuantizer":
        if granularity == "token" or (granularity == "group" and x is None):
            return cls(bits, symmetric, dynamic=True, full_range=full_range, group_size=group_size)
        params = cls._params(grouped(x, group_size), bits, granularity, symmetric)
        return cls(bits, symmetric, *params, full_range=full_range, group_size=group_size)

    @staticmethod
    def _params(x, bits, granularity, symmetric):
        if symmetric:
            return int_symmetric_scale(absmax(x, granularity), bits), None
        dims = {"tensor": None, "row": tuple(range(1, x.dim())), "channel": tuple(range(x.dim() - 1)),
                "token": (-1,), "group": (-1,)}[granularity]
        keep = granularity != "tensor"
        x = x.detach().float()
        x_min = x.amin(dim=dims, keepdim=keep) if dims else x.amin()
        x_max = x.amax(dim=dims, keepdim=keep) if dims else x.amax()
        if granularity == "channel":
            x_min, x_max = x_min.reshape(-1), x_max.reshape(-1)
        return int_asymmetric_params(x_min, x_max, bits)

    def _ranges(self, groups):
        return (self._params(groups, self.bits, "token", self.symmetric) if self.dynamic
                else (self.scale, self.zero))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = grouped(x, self.group_size)
        scale, zero = self._ranges(groups)
        if self.symmetric:
            out = int_quantize_symmetric(groups, self.bits, scale, self.full_range)
        else:
            out = int_quantize_asymmetric(groups, self.bits, scale, zero)
        # flatten, not reshape(x.shape): scales with leading candidate dimensions broadcast over x (the search)
        return out.to(x.dtype).flatten(-2) if self.group_size else out.to(x.dtype)

    def spec(self) -> Scheme:
        return Scheme(self.element, granularity_of(self.scale, self.dynamic, self.group_size), self.group_size,
                      dynamic=self.dynamic)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(int32 codes shaped as x, {"scale"[, "zero"]}) with decode(codes, ranges) == self(x) bit for bit."""
        groups = grouped(x, self.group_size)
        scale, zero = self._ranges(groups)
        if self.symmetric:
            codes, ranges = int_symmetric_codes(groups, self.bits, scale, self.full_range), {"scale": scale}
        else:
            codes, ranges = int_asymmetric_codes(groups, self.bits, scale, zero), {"scale": scale, "zero": zero}
        return codes.int().reshape(x.shape), ranges

    def decode(self, codes: torch.Tensor, ranges: dict) -> torch.Tensor:
        groups = grouped(codes, self.group_size).float()
        if "zero" in ranges:
            groups = groups - ranges["zero"]
        return (groups * ranges["scale"]).reshape(codes.shape)

    def extra_repr(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        return (f"INT{self.bits} {kind}" + (", dynamic per-token" if self.dynamic else "")
                + (f", groups of {self.group_size}" if self.group_size else ""))


class PermutedColumns(nn.Module):
    """Groups that are runs of a column order rather than of the columns themselves (GPTQ with act-order builds
    a group from the next `group_size` columns it processes): `inner` quantizes x[..., order] in consecutive
    groups, and the columns go back to their places. The order is what checkpoints call g_idx, spelt out."""

    def __init__(self, inner: nn.Module, order: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.register_buffer("order", order.long())
        self.register_buffer("inverse", torch.argsort(self.order))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x[..., self.order])[..., self.inverse]

    def spec(self) -> Scheme:
        return self.inner.spec()

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        codes, ranges = self.inner.encode(x[..., self.order])
        return codes[..., self.inverse], ranges

    def decode(self, codes: torch.Tensor, ranges: dict) -> torch.Tensor:
        return self.inner.decode(codes[..., self.order], ranges)[..., self.inverse]


def _build_fp(scheme: Scheme, x):
    return FPQuantizer.minmax(None if scheme.dynamic else x, scheme.element, scheme.granularity, scheme.group_size)


def _build_int(scheme: Scheme, x):
    element = scheme.element
    return IntQuantizer.minmax(None if scheme.dynamic else x, element.bits, scheme.granularity, element.symmetric,
                               element.full_range, scheme.group_size)


register_scale("exponent_bias", FPFormat, _build_fp)
register_scale("float", IntElement, _build_int)


def quantizer_to_state(q: nn.Module) -> tuple[dict, dict]:
    """(JSON-able description, tensors) that `quantizer_from_state` turns back into the same quantizer."""
    if isinstance(q, FPQuantizer):
        spec = {"kind": "fp", "exponent_bits": q.fmt.exponent_bits, "mantissa_bits": q.fmt.mantissa_bits,
                "dynamic": q.dynamic}
        if q.fmt.numerics != "paper":  # files written before the setting existed hold paper numerics
            spec["numerics"] = q.fmt.numerics
        tensors = {} if q.bias is None else {"bias": q.bias}
    elif isinstance(q, IntQuantizer):
        spec = {"kind": "int", "bits": q.bits, "symmetric": q.symmetric, "dynamic": q.dynamic,
                "full_range": q.full_range}
        tensors = {k: v for k, v in (("scale", q.scale), ("zero", q.zero)) if v is not None}
    elif isinstance(q, PermutedColumns):
        spec, tensors = quantizer_to_state(q.inner)
        return {"kind": "permuted", "inner": spec}, {"order": q.order} | {f"inner.{k}": v for k, v in tensors.items()}
    elif isinstance(q, BlockQuantizer):
        spec = {"kind": "block", "scheme": q.spec().to_dict()}
        tensors = {k: v for k, v in (("scale", q.scale), ("tensor_scale", q.tensor_scale)) if v is not None}
        return spec, tensors
    else:
        raise TypeError(f"cannot serialise quantizer {type(q).__name__}")
    if q.group_size:  # absent in files written before groups existed
        spec["group_size"] = q.group_size
    return spec, tensors


def quantizer_from_state(spec: dict, tensors: dict) -> nn.Module:
    if spec["kind"] == "fp":
        fmt = FPFormat(spec["exponent_bits"], spec["mantissa_bits"], spec.get("numerics", "paper"))
        return FPQuantizer(fmt, tensors.get("bias"), spec["dynamic"], spec.get("group_size", 0))
    if spec["kind"] == "int":
        return IntQuantizer(spec["bits"], spec["symmetric"], tensors.get("scale"), tensors.get("zero"),
                            spec["dynamic"], spec.get("full_range", False), spec.get("group_size", 0))
    if spec["kind"] == "permuted":
        inner = {k[len("inner."):]: v for k, v in tensors.items() if k.startswith("inner.")}
        return PermutedColumns(quantizer_from_state(spec["inner"], inner), tensors["order"])
    if spec["kind"] == "block":
        scheme = Scheme.from_dict(spec["scheme"])
        return BlockQuantizer(scheme.element, scheme.group_size, scheme.scale, tensors.get("scale"),
                              tensors.get("tensor_scale"), scheme.dynamic, scheme.rule or "even", scheme.four_over_six)
    raise ValueError(f"unknown quantizer kind {spec['kind']!r}")
