"""Perplexity as GPTQ / LLM-FP4 / FlatQuant report it: the evaluation text joined into one token stream,
cut into non-overlapping windows of `seqlen` tokens (the partial tail dropped), exp(mean token NLL)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .errors import UsageError
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
    for window in tqdm(perplexity_windows(tokens, seqlen, max_windows), desc=desc, disable=not progress):
        ids = window.reshape(1, -1).to(model.device)
        logits = model(ids, use_cache=False).logits[0, :-1].float()
        total_nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += seqlen - 1
    value = float(torch.exp(torch.tensor(total_nll / count)))
    check_finite_results({"ppl": {desc: value}})  # at once, not after every other evaluation
    return value
