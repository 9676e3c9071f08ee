"""Perplexity as GPTQ / LLM-FP4 / FlatQuant report it: the evaluation text joined into one token stream,
cut into non-overlapping windows of `seqlen` tokens (the partial tail dropped), exp(mean token NLL)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .adapters import adapter_for
from .errors import UsageError
from .models import get_module
from .onload import moved, onloader_of
from .pipeline import capture_block_inputs, run_block
from .report import check_finite_results


def perplexity_windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """The windows [W, seqlen] that perplexity scores: consecutive, non-overlapping, the partial tail dropped."""
    windows = tokens.numel() // seqlen
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows == 0:
        raise UsageError(f"the evaluation text has {tokens.numel()} tokens, fewer than one window of "
                         f"--ppl_seqlen {seqlen}; pass a smaller --ppl_seqlen or a longer text")
    return tokens[:windows * seqlen].reshape(windows, seqlen)


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, seqlen: int = 2048, max_windows: int | None = None,
               progress: bool = True, desc: str = "perplexity") -> float:
    total_nll, count = 0.0, 0
    windows = perplexity_windows(tokens, seqlen, max_windows)
    logits_of = streamed_logits(model, windows, desc, progress) if onloader_of(model).streams else None
    for index, window in enumerate(tqdm(windows, desc=desc, disable=not progress or logits_of is not None)):
        ids = window.reshape(1, -1).to(model.device)
        logits = (model(ids, use_cache=False).logits if logits_of is None else logits_of(index))[0, :-1].float()
        total_nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += seqlen - 1
    value = float(torch.exp(torch.tensor(total_nll / count)))
    check_finite_results({"ppl": {desc: value}})  # at once, not after every other evaluation
    return value


def streamed_logits(model, windows: torch.Tensor, desc: str, progress: bool):
    """For a model whose blocks are onloaded one at a time (utils/onload.py): every window runs through one block
    before the next block is loaded; returns logits_of(window index) -> [1, T, vocab], the final norm and lm_head
    applied to one window at a time as the model's own forward does."""
    adapter = adapter_for(model)
    if getattr(model.config.get_text_config(), "final_logit_softcapping", None):
        raise UsageError("block-by-block evaluation does not apply the final logit soft-capping of "
                         f"{model.config.model_type}; drop --offload")
    blocks, onloader = get_module(model, adapter.layers), onloader_of(model)
    with onloader.capturing(blocks):
        captured = capture_block_inputs(model, adapter, windows)
    hidden = captured.hidden
    for index, block in enumerate(tqdm(blocks, desc=f"{desc} (block by block)", disable=not progress)):
        with onloader.onload(block, index) as device:
            hidden = run_block(block, *moved((hidden, captured.call_kwargs[index]), device))
    norm, head = get_module(model, adapter.final_norm), get_module(model, adapter.lm_head)
    hidden = hidden.to(model.device)
    return lambda index: head(norm(hidden[index:index + 1]))
