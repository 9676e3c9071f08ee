"""LLM-FP4's block step (MinMax, FPQ baseline, FPQ): wrap the model's linears and table, then, block by block
on captured inputs, set each linear's weight and activation quantizers by MinMax or the format / exponent-bias
search of quant_layers.search. Workflow only: the numerics live in quant_layers.
"""
from __future__ import annotations

import torch
from torch import nn

from configs import QuantConfig
from quant_layers import LinearSearch, QuantEmbedding, QuantLinear, make_quantizer
from quant_layers.search import BIAS_FIRST, LOCAL, WEIGHT_FIRST, TokenSplit, search_embedding

from .adapters import ModelAdapter, adapter_for
from .distributed import input_maxima, token_split
from .models import get_module, set_module, untie_embeddings
from .pipeline import CalibrationReport, calibrate_model, capture_linear_inputs


def quantized_linear_paths(model, adapter: ModelAdapter) -> list[str]:
    blocks = get_module(model, adapter.layers)
    return [f"{adapter.layers}.{i}.{name}" for i in range(len(blocks))
            for group in adapter.linear_groups for name in group]


def prepare_model(model, config: QuantConfig, adapter: ModelAdapter | None = None) -> ModelAdapter:
    """Untie embeddings and replace every quantized linear / the table by its wrapper (idempotent)."""
    adapter = adapter or adapter_for(model)
    untie_embeddings(model, adapter)
    paths = quantized_linear_paths(model, adapter) + ([adapter.lm_head] if config.quantize_lm_head else [])
    for path in paths:
        module = get_module(model, path)
        if isinstance(module, nn.Linear):
            set_module(model, path, QuantLinear(module))
    table = get_module(model, adapter.embedding)
    if config.quantize_embedding and isinstance(table, nn.Embedding):
        scale = getattr(table, adapter.embedding_scale) if adapter.embedding_scale else None
        set_module(model, adapter.embedding, QuantEmbedding(table, scale))
    return adapter


# ----- per-module calibration -----
def calibrate_embedding(module: QuantEmbedding, config: QuantConfig):
    if config.e_bits >= 16:
        return
    w = module.weight.detach()
    if config.element == "fp" and config.embedding_search and config.method != "minmax":
        module.weight_quantizer = search_embedding(w, config.e_bits, config.search, config.fp_numerics)
    else:
        module.weight_quantizer = make_quantizer(config.scheme("embedding"), w)
    module.freeze()


def calibrate_linear(module: QuantLinear, inputs: torch.Tensor, config: QuantConfig, shared: dict | None = None,
                     split: TokenSplit = LOCAL) -> dict:
    """Set the weight and activation quantizers of one linear from its captured inputs [tokens, in].

    Linears that read the same inputs may pass one `shared` dict so input-side terms are computed once; `split`
    says where the inputs lie among every data-parallel rank's (utils.distributed.token_split)."""
    w = module.weight.detach()
    weight_scheme, input_scheme = config.scheme("weight"), config.scheme("input")
    quant_w, quant_a = weight_scheme is not None, input_scheme is not None
    if config.element == "int":  # MinMax INT: no search
        module.weight_quantizer = make_quantizer(weight_scheme, w) if quant_w else None
        module.act_quantizer = make_quantizer(input_scheme, input_maxima(inputs, split)) if quant_a else None
        module.freeze()
        return {}
    search = LinearSearch(w, inputs, config.search, per_channel=config.method == "fpq",
                          folded=config.method == "fpq" and config.preshift == "folded", shared=shared, split=split)
    w_fmt = weight_scheme.element if quant_w else None
    a_fmt = input_scheme.element if quant_a else None
    order = BIAS_FIRST if config.method == "fpq" else WEIGHT_FIRST
    weight, act, report = search.run(w_fmt, a_fmt, order, search=config.method != "minmax")
    module.weight_quantizer = search.weight_quantizer(weight, act) if quant_w else None
    if quant_a:
        module.act_quantizer, module.input_shift = search.act_quantizer(act)
    del search  # its cached loss terms are as large as the weight: free them before freeze() makes a copy
    module.freeze()
    return {**report, "w_format": weight.fmt.name if quant_w else None, "a_format": act.fmt.name if quant_a else None}


# ----- the block step -----
class LLMFP4Step:
    """LLM-FP4's calibration of the table, each block's linears and lm_head (pipeline.calibrate_model's step) on
    calibration windows of `window` tokens."""

    def __init__(self, config: QuantConfig, window: int):
        self.config, self.window = config, window

    def embedding(self, table: QuantEmbedding):
        calibrate_embedding(table, self.config)

    def block(self, block, index, hidden, call_kwargs, adapter, batch_size, report):
        return calibrate_block(block, index, hidden, call_kwargs, adapter, self.config, batch_size, report)

    def head(self, head: QuantLinear, inputs: torch.Tensor) -> dict:
        return calibrate_linear(head, inputs, self.config, split=token_split(inputs.shape[0], self.window))


def calibrate_blocks(model, config: QuantConfig, calib_data: torch.Tensor, adapter: ModelAdapter | None = None,
                     batch_size: int = 1, progress: bool = True, release_originals: bool = False,
                     restored_blocks: int = 0, after_block=None) -> CalibrationReport:
    """Calibrate `model` in place for the LLM-FP4 `config` on token windows `calib_data` [N, T] (see
    pipeline.calibrate_model for resuming)."""
    adapter = prepare_model(model, config, adapter)
    step = LLMFP4Step(config, calib_data.shape[1])
    return calibrate_model(model, step, calib_data, adapter, batch_size, progress, release_originals,
                           config.feed_quantized, restored_blocks, after_block, config.calib_attention)


def calibrate_block(block, index, hidden, call_kwargs, adapter, config, batch_size, report):
    """Calibrate every linear of one block on its inputs; returns the block's full-precision output."""
    heads = [group[0] for group in adapter.linear_groups]
    fp_out, inputs = capture_linear_inputs(block, heads, hidden, call_kwargs, batch_size)
    for group in adapter.linear_groups:
        shared, x = {}, inputs[group[0]]
        split = token_split(x.shape[0], hidden.shape[1])
        for name in group:
            path = f"{adapter.layers}.{index}.{name}"
            report.layers[path] = calibrate_linear(block.get_submodule(name), x, config, shared, split)
    return fp_out
