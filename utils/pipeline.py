"""The block-wise machinery every method shares: capture the first decoder block's inputs once, run one block
on captured hidden states, record what named modules inside a block receive while it runs; switch wrapped
modules between full-precision and quantized forward; the calibration report and its peak-memory probe.

Each block keeps its own call arguments: families that mix attention kinds (Gemma 3's sliding and full
layers, Mistral's sliding window) give each layer its own mask and rotary embedding.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from quant_layers import QuantEmbedding, QuantLinear
from quant_layers.flat import KVQuant

from .adapters import ModelAdapter
from .models import attention_implementation, get_module
from .onload import moved, onloader_of


class _StopForward(Exception):
    pass


@dataclass
class BlockInputs:
    hidden: torch.Tensor  # [N, T, H]: the first block's inputs for all N calibration windows
    call_kwargs: list[dict]  # per block: the keyword arguments the model passes it (masks, positions)


def capture_block_inputs(model, adapter: ModelAdapter, samples: torch.Tensor, batch_size: int = 1) -> BlockInputs:
    """The first block's inputs for `samples` [N, T], and every block's call arguments (taken from the first
    batch, whose forward runs up to the last block; later batches stop at the first)."""
    blocks = get_module(model, adapter.layers)
    hidden, call_kwargs = [], [None] * len(blocks)

    def hook_for(index):
        def hook(_module, args, kwargs):
            if index == 0:
                hidden.append((args[0] if args else kwargs["hidden_states"]).detach())
            if call_kwargs[index] is None:
                call_kwargs[index] = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values")}
                call_kwargs[index]["use_cache"] = False
            if index == len(blocks) - 1 or call_kwargs[-1] is not None:
                raise _StopForward
        return hook

    handles = [block.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        for start in range(0, len(samples), batch_size):
            try:
                model(samples[start:start + batch_size].to(model.device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return BlockInputs(torch.cat(hidden), call_kwargs)


def run_block(block: nn.Module, hidden: torch.Tensor, call_kwargs: dict, batch_size: int = 1) -> torch.Tensor:
    outs = []
    for start in range(0, hidden.shape[0], batch_size):
        out = block(hidden[start:start + batch_size], **call_kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return torch.cat(outs)


def record_inputs(block: nn.Module, names, hidden: torch.Tensor, call_kwargs: dict,
                  record: Callable[[str, torch.Tensor], None], batch_size: int = 1) -> torch.Tensor:
    """Run the block on `hidden`, calling record(name, x) with the input x of each named submodule as it
    runs; returns the block's outputs."""
    handles = [block.get_submodule(name).register_forward_pre_hook(
        lambda _module, args, name=name: record(name, args[0].detach())) for name in names]
    try:
        return run_block(block, hidden, call_kwargs, batch_size)
    finally:
        for handle in handles:
            handle.remove()


def capture_linear_inputs(block, names, hidden, call_kwargs, batch_size):
    """Block outputs and the flattened inputs [tokens, in] of each named linear (one forward pass)."""
    store = {name: [] for name in names}
    out = record_inputs(block, names, hidden, call_kwargs,
                        lambda name, x: store[name].append(x.reshape(-1, x.shape[-1])), batch_size)
    return out, {name: torch.cat(chunks) for name, chunks in store.items()}


def quant_modules(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}


def set_quantized(model, enabled: bool):
    """Switch every calibrated wrapper (and FlatQuant's attention Q/K/V quantizers) on or off."""
    for module in quant_modules(model).values():
        module.quantize = enabled and module.quantized_weight is not None
    for module in model.modules():
        if isinstance(module, KVQuant):
            module.quantize = enabled


def release_originals(model):
    """Drop the full-precision weight of every frozen wrapper (see QuantLinear.release_original)."""
    for module in quant_modules(model).values():
        if module.quantized_weight is not None:
            module.release_original()


@dataclass
class CalibrationReport:
    seconds: float = 0.0
    peak_memory_mb: float = 0.0
    block_seconds: list = field(default_factory=list)
    layers: dict = field(default_factory=dict)  # module path -> {"minmax", "searched", formats}
    param_path: str | None = None  # the parameter / matrix file written or read, when the run had one
    loaded: bool = False  # the parameters were loaded from param_path, not calibrated

    def to_dict(self) -> dict:
        return {"seconds": round(self.seconds, 2), "peak_memory_mb": round(self.peak_memory_mb, 1),
                "block_seconds": [round(s, 2) for s in self.block_seconds], "layers": self.layers}


class PeakMemory:
    """Peak memory while the block runs: CUDA's allocator peak, or on CPU the process's resident set
    sampled every 20 ms (the model itself included, as the reference's 7.6 GB figure)."""

    def __init__(self, device):
        self.device, self.peak_mb = device, 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        import threading
        import psutil
        process, self._stop = psutil.Process(), threading.Event()

        def sample():
            while True:
                self.peak_mb = max(self.peak_mb, process.memory_info().rss / 2 ** 20)
                if self._stop.wait(0.02):
                    return
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        else:
            self._stop.set()
            self._thread.join()


@torch.no_grad()
def calibrate_model(model, step, calib_data: torch.Tensor, adapter: ModelAdapter, batch_size: int = 1,
                    progress: bool = True, release_originals: bool = False, feed_quantized: bool = False,
                    restored_blocks: int = 0, after_block=None, attention: str | None = None) -> CalibrationReport:
    """Calibrate a model whose modules are wrapped, block by block on token windows `calib_data` [N, T], with a
    method's `step`: step.embedding(table), step.block(block, index, hidden, call_kwargs, adapter, batch_size,
    report) -> the block's full-precision output, step.head(lm_head, its inputs [tokens, in]) -> report entry.

    Blocks are calibrated on full-precision inputs unless `feed_quantized`. Resuming: `after_block(index, blocks)`
    is called after each finished block (to save the parameters so far); `restored_blocks` says that the table
    and the first blocks already hold the quantizers of an interrupted run of the same settings: they are not
    calibrated again, only run, so later blocks see the inputs the uninterrupted run gave them. `attention`: the
    attention implementation the calibration forwards use (models.attention_implementation; None: the model's).
    """
    report, started = CalibrationReport(), time.perf_counter()
    with PeakMemory(model.device) as memory, attention_implementation(model, attention):
        _calibrate_all(model, step, calib_data, adapter, batch_size, progress, report, release_originals,
                       feed_quantized, restored_blocks, after_block)
    report.seconds = time.perf_counter() - started
    report.peak_memory_mb = memory.peak_mb
    return report


def _calibrate_all(model, step, calib_data, adapter, batch_size, progress, report, release, feed_quantized, restored,
                   after_block):
    set_quantized(model, False)

    def finish(module):  # switch a calibrated module (or block) to quantized forward
        set_quantized(module, True)
        if release:
            release_originals(module)

    table = get_module(model, adapter.embedding)
    if isinstance(table, QuantEmbedding) and not restored:
        with tqdm(total=1, desc=f"calibrating embedding ({table.num_embeddings} rows)", disable=not progress) as bar:
            step.embedding(table)
            bar.update()
    if isinstance(table, QuantEmbedding):
        table.quantize = False  # blocks are calibrated on full-precision inputs

    blocks, onloader = get_module(model, adapter.layers), onloader_of(model)
    with onloader.capturing(blocks):
        captured = capture_block_inputs(model, adapter, calib_data, batch_size)
    hidden = captured.hidden
    if isinstance(table, QuantEmbedding):
        finish(table)
    for index, block in enumerate(tqdm(blocks, desc="calibrating blocks", disable=not progress)):
        block_start = time.perf_counter()
        with onloader.onload(block, index) as device:  # the block on the calibration device (utils/onload.py)
            hidden, call_kwargs = moved((hidden, captured.call_kwargs[index]), device)
            if index < restored:  # its quantizers are loaded: only its full-precision output is needed
                fp_out = run_block(block, hidden, call_kwargs, batch_size)
            else:
                fp_out = step.block(block, index, hidden, call_kwargs, adapter, batch_size, report)
            finish(block)
            hidden = run_block(block, hidden, call_kwargs, batch_size) if feed_quantized else fp_out
        report.block_seconds.append(time.perf_counter() - block_start)
        if after_block is not None and index >= restored:
            after_block(index, len(blocks))

    head = get_module(model, adapter.lm_head)
    if isinstance(head, QuantLinear):
        with tqdm(total=1, desc="calibrating lm_head", disable=not progress) as bar:
            normed = get_module(model, adapter.final_norm)(hidden)
            report.layers[adapter.lm_head] = step.head(head, normed.reshape(-1, normed.shape[-1]))
            bar.update()
        finish(head)
    set_quantized(model, True)
