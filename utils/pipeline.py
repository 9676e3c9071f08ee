"""The block-wise machinery every method shares: capture the first decoder block's inputs once, run one block
on captured hidden states, and record what named modules inside a block receive while it runs.

Each block keeps its own call arguments: families that mix attention kinds (Gemma 3's sliding and full
layers, Mistral's sliding window) give each layer its own mask and rotary embedding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

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
