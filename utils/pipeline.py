"""The block-wise machinery every method shares: capture the first decoder block's inputs once, run one block
on captured hidden states, record what named modules inside a block receive while it runs; switch wrapped
modules between full-precision and quantized forward; the calibration report and its peak-memory probe.

Each block keeps its own call arguments: families that mix attention kinds (Gemma 3's sliding and full
layers, Mistral's sliding window) give each layer its own mask and rotary embedding.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from quant_layers import QuantEmbedding, QuantLinear
from quant_layers.flat import KVQuant

from .adapters import ModelAdapter
from .models import get_module


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
