"""A re-statement of how the reference code (nbasyl/LLM-FP4 at 0598c95) turns the tensors of its own
parameter files into quantized values, written from its formulas for the tests: an independent check
of `utils.params.load_reference_pt` with `fp_numerics="reference"`.

What the reference keeps, and how it computes with it:
- exponent and mantissa bits are int64 0-d buffers, so in its clip (2 - 2 ** (-M)) * 2 ** (2 ** E - 1 - b)
  the power 2 ** (-M) is an integer power;
- the step is 2.0 ** (floor(log2|x| + b) clamped to >= 1, minus M, minus b), then round half to even;
- linear weights: per output row bias `w_interval` [out, 1, 1, 1]; activations: the tensor bias
  `a_interval`, or for FPQ the per-channel `a_bias` [in, 1] turned into
  clamp(round(a_bias), round(rho), round(rho) + 2^E - 1) - a_interval_zero_point + rho;
- the embedding: `interval`, per row [vocab, 1, 1, 1] or one scalar (MinMax).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def quantize(x: torch.Tensor, exponent_bits: torch.Tensor, mantissa_bits: torch.Tensor, bias: torch.Tensor):
    clip = (2 - 2 ** (-mantissa_bits)) * 2 ** (2 ** exponent_bits - 1 - bias)
    x = torch.min(torch.max(x, -clip), clip)
    exponent = torch.clamp(torch.floor(torch.log2(torch.abs(x)) + bias), 1.0)
    step = 2.0 ** (exponent - mantissa_bits - bias)
    return (x / step).round_().mul_(step)


def activation_bias(state: dict, name: str) -> torch.Tensor:
    rho = state[f"{name}.a_interval"].float()
    if f"{name}.a_bias" not in state:
        return rho
    low = torch.round(rho)
    channel = torch.clamp(torch.round(state[f"{name}.a_bias"]), low, low + 2 ** state[f"{name}.a_exponent_bit"] - 1)
    return (channel - state[f"{name}.a_interval_zero_point"] + rho).float()


def linear(state: dict, name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """The reference's quant_forward of one linear: its input split into per-channel slices [.., in, 1]
    when the activation bias is per channel, its weight viewed [out, 1, 1, in]."""
    out_features, in_features = weight.shape
    w_q = quantize(weight.view(out_features, 1, 1, in_features), state[f"{name}.w_exponent_bit"],
                   state[f"{name}.w_mantissa_bit"], state[f"{name}.w_interval"].float())
    a_bias = activation_bias(state, name)
    x_view = x.unsqueeze(-1) if a_bias.numel() > 1 else x.unsqueeze(-2)
    x_q = quantize(x_view, state[f"{name}.a_exponent_bit"], state[f"{name}.a_mantissa_bit"], a_bias).reshape_as(x)
    return F.linear(x_q, w_q.view(out_features, in_features), bias)


def embedding_table(state: dict, name: str, weight: torch.Tensor) -> torch.Tensor:
    rows, dim = weight.shape
    interval = state[f"{name}.interval"].float()
    view = weight.view(rows, 1, 1, dim) if interval.numel() > 1 else weight
    return quantize(view, state[f"{name}.exponent_bit"], state[f"{name}.mantissa_bit"], interval).view(rows, dim)
