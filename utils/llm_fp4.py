"""LLM-FP4's block step (MinMax, FPQ baseline, FPQ): wrap the model's linears and table, then, block by block
on captured inputs, set each linear's weight and activation quantizers by MinMax or the format / exponent-bias
search of quant_layers.search. Workflow only: the numerics live in quant_layers.
"""
from __future__ import annotations

import time

import torch
from torch import nn
from tqdm import tqdm

from configs import QuantConfig
from quant_layers import LinearSearch, QuantEmbedding, QuantLinear, make_quantizer
from quant_layers.search import BIAS_FIRST, WEIGHT_FIRST, search_embedding

from .adapters import ModelAdapter, adapter_for
from .models import get_module, set_module, untie_embeddings
from .pipeline import (CalibrationReport, PeakMemory, capture_block_inputs, record_inputs, release_originals,
                       run_block, set_quantized)


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


def calibrate_linear(module: QuantLinear, inputs: torch.Tensor, config: QuantConfig, shared: dict | None = None) -> dict:
    """Set the weight and activation quantizers of one linear from its captured inputs [tokens, in].

    Linears that read the same inputs may pass one `shared` dict so input-side terms are computed once."""
    w = module.weight.detach()
    weight_scheme, input_scheme = config.scheme("weight"), config.scheme("input")
    quant_w, quant_a = weight_scheme is not None, input_scheme is not None
    if config.element == "int":  # MinMax INT: no search
        module.weight_quantizer = make_quantizer(weight_scheme, w) if quant_w else None
        module.act_quantizer = make_quantizer(input_scheme, inputs) if quant_a else None
        module.freeze()
        return {}
    search = LinearSearch(w, inputs, config.search, per_channel=config.method == "fpq",
                          folded=config.method == "fpq" and config.preshift == "folded", shared=shared)
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


# ----- the block-wise driver -----
def capture_linear_inputs(block, names, hidden, call_kwargs, batch_size):
    """Block outputs and the flattened inputs [tokens, in] of each named linear (one forward pass)."""
    store = {name: [] for name in names}
    out = record_inputs(block, names, hidden, call_kwargs,
                        lambda name, x: store[name].append(x.reshape(-1, x.shape[-1])), batch_size)
    return out, {name: torch.cat(chunks) for name, chunks in store.items()}


@torch.no_grad()
def calibrate_blocks(model, config: QuantConfig, calib_data: torch.Tensor, adapter: ModelAdapter | None = None,
                     batch_size: int = 1, progress: bool = True, release_originals: bool = False,
                     restored_blocks: int = 0, after_block=None) -> CalibrationReport:
    """Calibrate `model` in place for the LLM-FP4 `config` on token windows `calib_data` [N, T].

    Resuming (FPQ / MinMax): `after_block(index, blocks)` is called after each finished block (to save the
    parameters so far); `restored_blocks` says that the table and the first blocks already hold the
    quantizers of an interrupted run of the same settings (see load_params(partial_ok=True)): they are not
    searched again, only run, so later blocks see the inputs the uninterrupted run gave them.
    """
    adapter = prepare_model(model, config, adapter)
    report, started = CalibrationReport(), time.perf_counter()
    with PeakMemory(model.device) as memory:
        _calibrate_all(model, config, calib_data, adapter, batch_size, progress, report, release_originals,
                       restored_blocks, after_block)
    report.seconds = time.perf_counter() - started
    report.peak_memory_mb = memory.peak_mb
    return report


def _calibrate_all(model, config, calib_data, adapter, batch_size, progress, report, release, restored, after_block):
    set_quantized(model, False)

    def finish(module):  # switch a calibrated module (or block) to quantized forward
        set_quantized(module, True)
        if release:
            release_originals(module)

    table = get_module(model, adapter.embedding)
    if isinstance(table, QuantEmbedding) and not restored:
        with tqdm(total=1, desc=f"calibrating embedding ({table.num_embeddings} rows)", disable=not progress) as bar:
            calibrate_embedding(table, config)
            bar.update()
    if isinstance(table, QuantEmbedding):
        table.quantize = False  # blocks are calibrated on full-precision inputs

    captured = capture_block_inputs(model, adapter, calib_data, batch_size)
    hidden = captured.hidden
    if isinstance(table, QuantEmbedding):
        finish(table)
    blocks = get_module(model, adapter.layers)
    for index, block in enumerate(tqdm(blocks, desc="calibrating blocks", disable=not progress)):
        block_start = time.perf_counter()
        call_kwargs = captured.call_kwargs[index]
        if index < restored:  # its quantizers are loaded: only its full-precision output is needed
            fp_out = run_block(block, hidden, call_kwargs, batch_size)
        else:
            fp_out = calibrate_block(block, index, hidden, call_kwargs, adapter, config, batch_size, report)
        finish(block)
        hidden = run_block(block, hidden, call_kwargs, batch_size) if config.feed_quantized else fp_out
        report.block_seconds.append(time.perf_counter() - block_start)
        if after_block is not None and index >= restored:
            after_block(index, len(blocks))

    head = get_module(model, adapter.lm_head)
    if isinstance(head, QuantLinear):
        with tqdm(total=1, desc="calibrating lm_head", disable=not progress) as bar:
            normed = get_module(model, adapter.final_norm)(hidden)
            report.layers[adapter.lm_head] = calibrate_linear(head, normed.reshape(-1, normed.shape[-1]), config)
            bar.update()
        finish(head)
    set_quantized(model, True)


def calibrate_block(block, index, hidden, call_kwargs, adapter, config, batch_size, report):
    """Calibrate every linear of one block on its inputs; returns the block's full-precision output."""
    heads = [group[0] for group in adapter.linear_groups]
    fp_out, inputs = capture_linear_inputs(block, heads, hidden, call_kwargs, batch_size)
    for group in adapter.linear_groups:
        shared = {}
        for name in group:
            path = f"{adapter.layers}.{index}.{name}"
            report.layers[path] = calibrate_linear(block.get_submodule(name), inputs[group[0]], config, shared)
    return fp_out
