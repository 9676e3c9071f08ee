"""Calibrating grouped and block-scaled weight formats (NVFP4, MX, INT groups): LLM-FP4's output-error search of
the clipping factor, NVFP4's four over six, and the per-group quantizers GPTQ needs.

The search carries LLM-FP4's idea over: a block's scale is not fixed by its absolute maximum but by gamma times
it, gamma searched per output row on the `--search_intervals` grid, and the loss is the layer's output error on
the calibration inputs (with the inputs quantized as they will be at run time), not the weight error. Every
candidate is still the same format, only with other stored scales.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .blocks import BlockQuantizer, nvfp4_tensor_scale, tensor_scale_aim
from .schemes import BLOCK_SCALES, Scheme, make_quantizer
from .search import LOCAL, SearchSettings, TokenSplit, budget_elements, grid_argmin, token_sample


def weight_quantizer(scheme: Scheme, w: torch.Tensor, *, tensor_scale: torch.Tensor | None = None,
                     clip: torch.Tensor | None = None, four_over_six: bool = False,
                     importance: torch.Tensor | None = None) -> nn.Module:
    """A static quantizer of w [rows, n] in the grouped `scheme`, its ranges from `clip` times each block's (or
    group's) absolute maximum; clip [..., rows, 1] may carry leading candidate dimensions. `tensor_scale`: NVFP4's
    FP32 scale (shared by fused layers). `four_over_six`: NVFP4 blocks choose the 6- or 4-mapping (importance
    weights each input channel's error)."""
    if four_over_six and scheme.scale != "e4m3":
        raise ValueError(f"four over six chooses between NVFP4 (E4M3) block scales, not {scheme.name}")
    if four_over_six:
        return BlockQuantizer.four_over_six(w, scheme.element, scheme.group_size, tensor_scale=tensor_scale,
                                            clip=clip, importance=importance)
    if scheme.scale in BLOCK_SCALES:
        return BlockQuantizer.from_tensor(w, scheme.element, scheme.group_size, scheme.scale,
                                          tensor_scale=tensor_scale, clip=clip, rule=scheme.rule)
    quantizer = make_quantizer(scheme, w)
    if clip is not None:  # a float scale: clipping the range is scaling the scale
        quantizer.scale = quantizer.scale * clip.reshape(*clip.shape, *[1] * (quantizer.scale.dim() - 2))
    return quantizer


def group_quantizer(scheme: Scheme, columns: torch.Tensor, **options) -> nn.Module:
    """GPTQ's quantizer of one group of columns [rows, g] (one block per row): its ranges come from these
    columns, and it quantizes any single one of them."""
    if scheme.scale in BLOCK_SCALES:
        block = weight_quantizer(replace(scheme, group_size=columns.shape[1]), columns, **options)
        return BlockQuantizer(block.fmt, 1, block.encoding, block.scale, block.tensor_scale, rule=block.rule or "even")
    return weight_quantizer(replace(scheme, granularity="row", group_size=0), columns, **options)


class OutputError:
    """The squared output error ||X w_r - Xq q_r||^2 of each row r of a linear layer, for quantized rows q, from
    Gram matrices of its calibration inputs X and of their run-time quantized form Xq:
    q'(Xq'Xq)q - 2 q'(Xq'X)w + w'(X'X)w. Weight-only formats pass X'X for all three."""

    def __init__(self, weight: torch.Tensor, gram_qq: torch.Tensor, gram_qx: torch.Tensor, gram_xx: torch.Tensor):
        w = weight.detach().float()
        self.gram = gram_qq
        self.cross = 2 * w @ gram_qx.T  # row r: 2 (Xq'X w_r)'
        self.energy = ((w @ gram_xx) * w).sum(-1)

    def __call__(self, q: torch.Tensor, rows=slice(None)) -> torch.Tensor:
        """Errors [..., len(rows)] of quantized rows q [..., len(rows), in]."""
        return ((q @ self.gram - self.cross[rows]) * q).sum(-1) + self.energy[rows]

    def importance(self) -> torch.Tensor:
        """Each input channel's weight in the output error: the quantized inputs' second moment."""
        return self.gram.diagonal()


def search_clip(weight: torch.Tensor, error: OutputError, build, settings: SearchSettings) -> torch.Tensor:
    """Per-row clip factors [rows, 1] on the settings' gamma grid minimising `error`; build(w_rows, clip) is the
    quantizer of those rows for clip factors [C, len(rows), 1]."""
    w = weight.detach().float()
    gammas = settings.gammas().to(w.device)

    def loss(candidates, rows):  # candidates [C, len(rows)]
        return error(build(w[rows], candidates[..., None])(w[rows]), rows)

    index, _ = grid_argmin(loss, gammas, w.shape[0], settings.strategy, w.shape[1], budget_elements(settings, w.device))
    return gammas[index][:, None]


def search_input_tensor_scale(act: BlockQuantizer, inputs: torch.Tensor, weight: torch.Tensor,
                              quantized_weight: torch.Tensor, settings: SearchSettings,
                              split: TokenSplit = LOCAL) -> BlockQuantizer:
    """The activation side of the search for NVFP4 inputs, whose only static parameter is the FP32 tensor scale:
    gamma times the inputs' maximum sets it, gamma on the settings' grid minimising the output error
    ||X W' - Xq(gamma) Q'||^2 over `act_search_tokens` of the inputs, summed over every layer that reads them
    (W, Q: their full-precision and quantized weights stacked by rows). A smaller gamma clips the largest blocks
    at E4M3's maximum and gives the others finer block scales. Returns a dynamic quantizer like `act` with the
    chosen tensor scale; gamma = 1 is the calibrated maximum's (RTN's), computed in the inputs' dtype as RTN does.
    Under a data-parallel `split` the maximum and the losses are over every worker's tokens."""
    amax = split.max(inputs.detach().abs().amax())
    x = token_sample(inputs, settings.act_search_tokens, settings.seed, split).float()
    samples = split.sampled(inputs.shape[0], settings.act_search_tokens)
    target, quantized_weight = x @ weight.float().T, quantized_weight.float()
    gammas = settings.gammas().to(x.device)

    def with_scale(gamma):
        scale = nvfp4_tensor_scale((amax.float() * gamma).to(amax.dtype), tensor_scale_aim(act.four_over_six), act.fmt)
        return BlockQuantizer(act.fmt, act.block_size, act.encoding, dynamic=True, tensor_scale=scale,
                              four_over_six=act.four_over_six)

    def loss(candidates, _rows):  # candidates [C, 1]: the whole tensor is one "row"
        return split.sum(torch.stack([(with_scale(g)(x) @ quantized_weight.T - target).square().sum()
                                      for g in candidates[:, 0]]))[:, None]

    index, _ = grid_argmin(loss, gammas, 1, settings.strategy, samples * x.shape[1],
                           budget_elements(settings, x.device))
    return with_scale(gammas[index[0]])
