"""GPTQ weight quantization (Frantar et al., 2023) and its round-to-nearest baseline. Pure numerics.

GPTQ quantizes a linear layer's weight one input column at a time and folds each column's rounding
error into the columns not yet quantized, weighted by the inverse Hessian H = 2/N sum x x^T of the
layer's squared output error. The caller collects the inputs (HessianAccumulator) and supplies the
element format through `make_quantizer(w) -> module`: it builds a per-row quantizer from a slice of
columns w [out, k], and the module quantizes any [out, k'] slice with those row parameters, which is
how GPTQ applies it to one column at a time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .blocks import BlockQuantizer
from .quantizers import FPQuantizer, IntQuantizer, PermutedColumns

QuantizerFactory = Callable[[torch.Tensor], nn.Module]
DAMPING_RETRIES = 3  # each retry multiplies the damping by 10


class HessianNotPositiveDefinite(ValueError):
    """The damped Hessian has no Cholesky factor: the calibration inputs do not determine the weight."""


# X'X is symmetric: of a GRAM_PARTS x GRAM_PARTS tiling only the tiles on and above the diagonal are computed
# (3 of 4: a quarter of the work saved, in few enough matmuls that a GPU does not wait on launches)
GRAM_PARTS = 2


def gram_tiles(features: int) -> list[tuple[slice, slice]]:
    """(rows, columns) of the tiles on and above the diagonal of a features x features matrix."""
    edges = [round(i * features / GRAM_PARTS) for i in range(GRAM_PARTS + 1)]
    spans = [slice(start, end) for start, end in zip(edges, edges[1:])]
    return [(rows, columns) for i, rows in enumerate(spans) for columns in spans[i:]]


def add_upper_gram(total: torch.Tensor, x: torch.Tensor):
    """total += x'x for x [tokens, features], on the tiles on and above the diagonal only (full_gram completes it).
    The products run in x's dtype and are added in total's (a float64 total sums float32 products)."""
    for rows, columns in gram_tiles(x.shape[1]):
        total[rows, columns] += x[:, rows].T @ x[:, columns]


def full_gram(upper: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose tiles on and above the diagonal are those of `upper` (add_upper_gram's sums)."""
    full = upper.clone()
    for rows, columns in gram_tiles(upper.shape[0]):
        if rows != columns:
            full[columns, rows] = upper[rows, columns].T
    return full


class HessianAccumulator:
    """H = 2/N sum x x^T over the N input vectors of a linear layer, fed in batches as they arrive."""

    def __init__(self, in_features: int, device="cpu"):
        self.in_features = in_features
        self.tokens = 0
        self._hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor):
        """Add the inputs x [..., in_features] (any leading dims)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"inputs of shape {tuple(x.shape)} do not fit a layer with {self.in_features} "
                             "input features")
        x = x.detach().reshape(-1, self.in_features).to(self._hessian.device, torch.float32)
        total = self.tokens + x.shape[0]
        if total == 0:
            return
        # a running mean rather than a sum: H keeps the scale of one token however many arrive
        self._hessian.mul_(self.tokens / total)
        x = x * math.sqrt(2 / total)
        self._hessian.addmm_(x.T, x)
        self.tokens = total

    @property
    def hessian(self) -> torch.Tensor:
        return self._hessian


@dataclass
class GPTQResult:
    weight: torch.Tensor  # the quantized weight, in the input weight's dtype
    quantizers: list[nn.Module]  # one per group: quantizers[group_index[j]] quantizes column j
    group_index: torch.Tensor  # [in] long: the group of each column, in the weight's column order
    row_losses: torch.Tensor  # [out] float64: each row's share of the loss

    @property
    def loss(self) -> float:
        """See gptq_quantize and rtn_quantize."""
        return float(self.row_losses.sum())

    def rows(self, rows: slice) -> "GPTQResult":
        """The result for a run of rows alone. GPTQ treats every row on its own (a row's updates read only the
        row and H), so this is what quantizing those rows alone gives: layers that read the same inputs, stacked,
        are quantized in one pass over the columns."""
        return GPTQResult(self.weight[rows], [rows_of(q, rows) for q in self.quantizers], self.group_index,
                          self.row_losses[rows])

    def weight_quantizer(self) -> nn.Module:
        """One quantizer holding every group's range (per row, or per row x group), on whose grid `weight` lies.
        Groups whose columns act-order scattered are runs of a column order: a PermutedColumns quantizer."""
        if len(self.quantizers) == 1:
            return self.quantizers[0]
        size = self.group_index.numel() // len(self.quantizers)
        merged = merge_row_quantizers(self.quantizers, size)
        positions = torch.arange(self.group_index.numel(), device=self.group_index.device)
        if torch.equal(self.group_index, positions // size):
            return merged
        # a stable sort by group keeps each group's columns in their processing order; any order within a
        # group would do, since a group's range is the same for all its columns
        return PermutedColumns(merged, torch.argsort(self.group_index, stable=True))


def merge_row_quantizers(quantizers: list[nn.Module], group_size: int) -> nn.Module:
    """Per-row quantizers of consecutive column groups as one quantizer with one range per row x group."""
    first = quantizers[0]

    def stacked(name):
        parts = [getattr(q, name) for q in quantizers]
        return None if parts[0] is None else torch.stack([part.reshape(-1, 1) for part in parts], dim=1)
    if isinstance(first, FPQuantizer):
        return FPQuantizer(first.fmt, stacked("bias"), group_size=group_size)
    if isinstance(first, BlockQuantizer):  # one-block quantizers (block_search.group_quantizer): scales side by side
        return BlockQuantizer(first.fmt, group_size, first.encoding, torch.cat([q.scale for q in quantizers], -1),
                              first.tensor_scale, rule=first.rule or "even")
    return IntQuantizer(first.bits, first.symmetric, stacked("scale"), stacked("zero"),
                        full_range=first.full_range, group_size=group_size)


def rows_of(quantizer: nn.Module, rows: slice) -> nn.Module:
    """The quantizer of a run of rows of a per-row quantizer (one range per row, or per row x group)."""
    if isinstance(quantizer, FPQuantizer):
        return FPQuantizer(quantizer.fmt, quantizer.bias[rows], group_size=quantizer.group_size)
    if isinstance(quantizer, BlockQuantizer):
        return BlockQuantizer(quantizer.fmt, quantizer.block_size, quantizer.encoding, quantizer.scale[rows],
                              quantizer.tensor_scale, rule=quantizer.rule or "even")
    zero = None if quantizer.zero is None else quantizer.zero[rows]
    return IntQuantizer(quantizer.bits, quantizer.symmetric, quantizer.scale[rows], zero,
                        full_range=quantizer.full_range, group_size=quantizer.group_size)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, make_quantizer: QuantizerFactory, *,
                  blocksize: int = 128, percdamp: float = 0.01, act_order: bool = False, groupsize: int = -1,
                  static_groups: bool = False) -> GPTQResult:
    """Quantize `weight` [out, in] with GPTQ against the Hessian [in, in] of its layer's inputs.

    percdamp: percdamp * mean(diag H) is added to the diagonal (10x more on each failed Cholesky).
    act_order: quantize the columns in order of decreasing H_ii (the most active inputs first).
    groupsize > 0: a quantizer per `groupsize` columns, built when GPTQ reaches the group from its
    error-compensated weights; with act_order the groups are runs of the processing order. With
    static_groups the quantizers are built up front from the original weight and a column keeps the
    group of its original position whatever the order.
    loss: sum over columns of (w - q)^2 / [H^-1]_jj / 2, GPTQ's prediction of the increase of the mean
    squared output error per token ||X W^T - X Q^T||^2 / N (exact for the damped H).
    blocksize only sets how many columns share one lazy update; the result does not depend on it.
    """
    if weight.dim() != 2:
        raise ValueError(f"GPTQ quantizes a 2-d weight [out, in], got shape {tuple(weight.shape)}")
    in_features = weight.shape[1]
    if tuple(hessian.shape) != (in_features, in_features):
        raise ValueError(f"Hessian of shape {tuple(hessian.shape)} does not fit a weight with {in_features} "
                         f"input features (expected ({in_features}, {in_features}))")
    w = weight.detach().float().clone()
    h = hessian.detach().to(w.device, torch.float32).clone()
    if not torch.isfinite(h).all():
        raise ValueError("the Hessian has inf/NaN entries: the layer's calibration inputs are not finite")
    # an input that is always zero does not constrain its column: pin the column to zero (so it does not
    # widen the quantization range either) and give H a unit diagonal there to keep it invertible
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1
    w[:, dead] = 0

    dynamic_groups = groupsize > 0 and not static_groups
    if dynamic_groups:
        quantizers, group_index = [], torch.empty(in_features, dtype=torch.long, device=w.device)
    else:
        quantizers, group_index = _quantizers_up_front(w, make_quantizer, groupsize)
    positions = torch.arange(in_features, device=w.device)
    order = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else positions
    if dynamic_groups:
        group_index[order] = positions // groupsize
    group_of_position = group_index[order].tolist()
    w, h = w[:, order], h[order][:, order]
    hinv = _upper_cholesky_of_inverse(h, percdamp)

    starts = set(range(0, in_features, blocksize))
    if dynamic_groups:  # a block starts at each group, so the group's quantizer sees every earlier update
        starts |= set(range(0, in_features, groupsize))
    edges = sorted(starts) + [in_features]
    q = torch.zeros_like(w)
    row_losses = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    for start, end in zip(edges[:-1], edges[1:]):
        if dynamic_groups and start % groupsize == 0:
            quantizers.append(make_quantizer(w[:, start:start + groupsize]))
        # the block's columns as contiguous rows [columns, out]: each step reads and updates whole rows
        columns, quantized = w[:, start:end].T.contiguous(), torch.empty(end - start, w.shape[0], device=w.device)
        errors = torch.empty_like(quantized)
        for i, j in enumerate(range(start, end)):
            quantized[i] = quantizers[group_of_position[j]](columns[i, :, None])[:, 0]
            errors[i] = (columns[i] - quantized[i]) / hinv[j, j]
            # an outer product, elementwise: no BLAS call per column
            columns[i + 1:] -= hinv[j, j + 1:end, None] * errors[i]
        q[:, start:end] = quantized.T
        row_losses += errors.double().square().sum(0) / 2
        # the columns after the block receive its errors in one matmul (GPTQ's lazy batch update)
        w[:, end:] -= errors.T @ hinv[start:end, end:]

    q = q[:, torch.argsort(order)]
    return GPTQResult(q.to(weight.dtype), quantizers, group_index, row_losses)


def rtn_quantize(weight: torch.Tensor, make_quantizer: QuantizerFactory, groupsize: int = -1) -> GPTQResult:
    """Round-to-nearest with the same quantizers and groups. loss = ||W - Q||^2, which is GPTQ's loss for
    H = 2I (uncorrelated unit inputs), where GPTQ does the same as RTN."""
    w = weight.detach().float()
    quantizers, group_index = _quantizers_up_front(w, make_quantizer, groupsize)
    width = groupsize if groupsize > 0 else w.shape[1]
    q = torch.cat([quantizer(w[:, i * width:(i + 1) * width]) for i, quantizer in enumerate(quantizers)], dim=1)
    return GPTQResult(q.to(weight.dtype), quantizers, group_index, (w - q).double().square().sum(1))


def _quantizers_up_front(w: torch.Tensor, make_quantizer: QuantizerFactory, groupsize: int):
    """One quantizer for all columns, or one per `groupsize` consecutive columns, and each column's group."""
    in_features = w.shape[1]
    if groupsize <= 0:
        return [make_quantizer(w)], torch.zeros(in_features, dtype=torch.long, device=w.device)
    quantizers = [make_quantizer(w[:, i:i + groupsize]) for i in range(0, in_features, groupsize)]
    return quantizers, torch.arange(in_features, device=w.device) // groupsize


def _upper_cholesky_of_inverse(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1 (in float64, returned as float32): its row j holds the
    update that spreads column j's error over the later columns, and [j, j]^2 = [H_F^-1]_jj, with F the
    columns j and after."""
    h = h.double()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    mean_diagonal = h.diagonal().mean()
    for attempt in range(DAMPING_RETRIES + 1):
        lower, info = torch.linalg.cholesky_ex(h + percdamp * 10 ** attempt * mean_diagonal * eye)
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info == 0:
                return upper.float()
    raise HessianNotPositiveDefinite(f"the Hessian is not positive definite even with "
                                     f"{percdamp * 10 ** DAMPING_RETRIES:g} x mean(diag H) damping: raise --percdamp "
                                     "(or calibrate on more tokens)")
