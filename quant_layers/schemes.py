"""Quantization schemes: what one operand's quantizer is, as data.

A `Scheme` names an element format (any ExMy `FPFormat`, or an `IntElement`), a granularity (one range per
tensor, per output row, per input channel, per token, or per group of `group_size` consecutive elements
along the last, reduction, dimension), how the range is encoded (`scale`), and whether the range is fixed
by calibration (static) or taken from each input at run time (dynamic).

`make_quantizer(scheme, x)` turns a scheme into a quantizer module whose range is x's absolute maximum
(MinMax); searches and GPTQ start from it. Builders are registered by scale encoding, so a new kind of scale
is one builder and one `register_scale` call; every quantizer answers `spec()` with its scheme.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from .formats import FPFormat

GRANULARITIES = ("tensor", "row", "channel", "token", "group")


@dataclass(frozen=True)
class IntElement:
    """INT-`bits`: symmetric levels -(2^(b-1)-1)..2^(b-1)-1 (`full_range` adds -2^(b-1), as GPTQ and FlatQuant
    use), or asymmetric 0..2^b-1 with an integer zero point."""

    bits: int
    symmetric: bool = True
    full_range: bool = False

    def __post_init__(self):
        if not 2 <= self.bits <= 16:
            raise ValueError(f"INT bits must be in 2..16, got {self.bits}")

    @property
    def name(self) -> str:
        return f"INT{self.bits}" + ("" if self.symmetric else "-asym")


DEFAULT_SCALE = {FPFormat: "exponent_bias", IntElement: "float"}
BLOCK_SCALES = ("e8m0", "e4m3")  # quant_layers.blocks: MX power-of-two, NVFP4 E4M3 x FP32
Builder = Callable[["Scheme", "torch.Tensor | None"], nn.Module]
# scale encoding -> (the element type it applies to, the builder of its quantizers); filled by register_scale
SCALES: dict[str, tuple[type, Builder]] = {}


def register_scale(encoding: str, element_type: type, builder: Builder):
    """Let schemes use this scale encoding; `make_quantizer` builds their quantizers with `builder(scheme, x)`."""
    SCALES[encoding] = (element_type, builder)


@dataclass(frozen=True)
class Scheme:
    element: FPFormat | IntElement
    granularity: str = "tensor"
    group_size: int = 0  # elements per group along the last dimension; only with granularity "group"
    scale: str = ""  # "" = the element's default: LLM-FP4's real exponent bias for FP, a float scale for INT
    dynamic: bool = False  # "token" is always dynamic; "group" may be (per token x group)
    rule: str = ""  # E8M0 block scales: how a block maximum becomes a power of two (quant_layers.blocks.MX_RULES)
    tensor_scale: str = ""  # E4M3 block scales of dynamic inputs: FP32 tensor scale "static" (calibrated) or "dynamic"
    # E4M3 block scales of dynamic inputs: each block maps its maximum to 6 or to 4, whichever errs less ("four over
    # six", chosen at run time by the quantization kernel)
    four_over_six: bool = False

    def __post_init__(self):
        if not self.scale:
            object.__setattr__(self, "scale", DEFAULT_SCALE[type(self.element)])
        if self.granularity == "token":
            object.__setattr__(self, "dynamic", True)
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {self.granularity!r}; choose from {GRANULARITIES}")
        if (self.granularity == "group") != (self.group_size > 0):
            raise ValueError("a group size is given with granularity 'group', and only then")
        if self.scale not in SCALES:
            raise ValueError(f"unknown scale encoding {self.scale!r}; choose from {tuple(SCALES)}")
        if not isinstance(self.element, SCALES[self.scale][0]):
            raise ValueError(f"scale encoding {self.scale!r} does not apply to {self.element.name}")
        if self.dynamic and self.granularity not in ("token", "group"):
            raise ValueError(f"a dynamic range is per token or per token x group, not per {self.granularity}")
        if self.scale in BLOCK_SCALES and self.granularity != "group":
            raise ValueError(f"{self.scale} scales belong to blocks: granularity 'group' with a block size")
        defaults = {"rule": "even" if self.scale == "e8m0" else "",
                    "tensor_scale": "static" if self.scale == "e4m3" else ""}
        for name, default in defaults.items():
            if not getattr(self, name):
                object.__setattr__(self, name, default)
            elif not default:
                raise ValueError(f"{name} applies to {'e8m0' if name == 'rule' else 'e4m3'} block scales only")
        if self.four_over_six and not (self.scale == "e4m3" and self.dynamic):
            raise ValueError("four over six as a scheme applies to dynamic E4M3 (NVFP4 input) blocks; weights choose "
                             "it in their static scales")

    @property
    def name(self) -> str:
        where = f"group{self.group_size}" if self.granularity == "group" else self.granularity
        scale = f"/{self.scale}" if self.scale in BLOCK_SCALES else ""
        return (f"{self.element.name}/{where}{scale}" + ("/dynamic" if self.dynamic and self.granularity != "token" else "")
                + ("/4over6" if self.four_over_six else ""))

    def to_dict(self) -> dict:
        element = asdict(self.element)
        element["kind"] = "fp" if isinstance(self.element, FPFormat) else "int"
        return {"element": element, "granularity": self.granularity, "group_size": self.group_size,
                "scale": self.scale, "dynamic": self.dynamic, "rule": self.rule, "tensor_scale": self.tensor_scale,
                "four_over_six": self.four_over_six}

    @classmethod
    def from_dict(cls, data: dict) -> "Scheme":
        element = dict(data["element"])
        kind = element.pop("kind")
        element = FPFormat(**element) if kind == "fp" else IntElement(**element)
        return cls(element, data["granularity"], data["group_size"], data["scale"], data["dynamic"],
                   data.get("rule", ""), data.get("tensor_scale", ""), data.get("four_over_six", False))


def make_quantizer(scheme: Scheme, x: torch.Tensor | None = None) -> nn.Module:
    """A quantizer for `scheme`, its static range set from x's absolute maximum (x unused when dynamic, except
    for the calibrated tensor scale of dynamic NVFP4 inputs)."""
    if x is None and not scheme.dynamic:
        raise ValueError(f"a static {scheme.name} quantizer needs the tensor whose range it takes")
    return SCALES[scheme.scale][1](scheme, x)




_E2M1, _INT4 = FPFormat(2, 1), IntElement(4, full_range=True)
# Formats by name: (element, block size, scale encoding, inputs quantized). The block formats are the OCP MX and
# NVIDIA NVFP4 ones as compressed-tensors defines them; INT4 in groups of 128 is there for comparison.
PRESETS = {
    "NVFP4": (_E2M1, 16, "e4m3", True), "NVFP4A16": (_E2M1, 16, "e4m3", False),
    "MXFP4": (_E2M1, 32, "e8m0", True), "MXFP4A16": (_E2M1, 32, "e8m0", False),
    "MXFP6_E2M3": (FPFormat(2, 3), 32, "e8m0", True), "MXFP6_E3M2": (FPFormat(3, 2), 32, "e8m0", True),
    "MXFP8_E4M3": (FPFormat(4, 3), 32, "e8m0", True), "MXFP8_E5M2": (FPFormat(5, 2), 32, "e8m0", True),
    "W4A16_G128": (_INT4, 128, "float", False), "W4A4_G128": (_INT4, 128, "float", True),
}


def preset(name: str) -> tuple[Scheme, Scheme | None]:
    """(weight scheme, input scheme or None for weight-only) of a named format: static weight blocks, dynamic
    per-token input blocks. Built on call, once the scale encodings are registered."""
    if name not in PRESETS:
        raise ValueError(f"unknown format {name!r}; choose from {', '.join(PRESETS)}")
    element, size, encoding, inputs = PRESETS[name]
    weight = Scheme(element, "group", size, encoding)
    return weight, Scheme(element, "group", size, encoding, dynamic=True) if inputs else None
