"""Wrapped modules that fake-quantize a linear layer (weight and input) or an embedding table.

The quantized weight is computed once by `freeze()` after calibration and cached, so a forward pass
costs one activation quantization plus the original matmul. `release_original()` then drops the
full-precision weight, so a quantized model holds one copy of its weights instead of two.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _FrozenWeight(nn.Module):
    """Caching of the quantized weight, shared by the linear and the embedding wrappers."""

    released = False
    weight_on_grid = False  # the weight holds quantized values that its quantizer cannot recompute from W (GPTQ's)

    def shifted_weight(self) -> torch.Tensor:
        return self.weight.detach().float()

    def freeze(self, on_grid: bool = False):
        """Cache Q_w(W) in the weight's dtype and switch to quantized forward. `on_grid`: W already holds
        quantized values (GPTQ's), which are cached as they are; the weight quantizer only describes them."""
        if self.released:
            raise RuntimeError("the full-precision weight was released; reload the model to quantize it again")
        w = self.shifted_weight()
        if self.weight_quantizer is not None and not on_grid:
            w = self.weight_quantizer(w)
        self.quantized_weight = w.to(self.weight.dtype)
        self.weight_on_grid = on_grid
        self.quantize = True

    def release_original(self):
        """Replace the full-precision weight by the cached quantized one (which stays its own buffer),
        freeing one copy; the module can then only run quantized."""
        if self.quantized_weight is None:
            raise RuntimeError("freeze() the module before releasing its full-precision weight")
        self.weight = nn.Parameter(self.quantized_weight, requires_grad=False)
        self.released = True

    def full_precision_weight(self) -> torch.Tensor:
        if self.released:
            raise RuntimeError("this model was quantized with its full-precision weights released "
                               "(release_originals=True); load it again to run it in full precision")
        return self.weight


class QuantLinear(_FrozenWeight):
    """y = Q_a(T(x) * 2^shift) @ Q_w(W * 2^-shift)^T + b.

    `input_shift` holds the integer per-input-channel exponent offsets of the *folded* pre-shifted bias
    (LLM-FP4 sec. 4.2): the offsets live in the weights and the activations use one tensor bias. It is
    None in every other mode. `input_transform` T is the online part of a FlatQuant transform whose inverse
    is already in W; it applies in full precision too, since W is only right for transformed inputs.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight_quantizer: nn.Module | None = None
        self.act_quantizer: nn.Module | None = None
        self.input_transform: nn.Module | None = None
        self.register_buffer("input_shift", None)
        self.register_buffer("input_scale", None, persistent=False)  # 2^input_shift, cached by freeze()
        self.register_buffer("quantized_weight", None, persistent=False)
        self.quantize = False

    def shifted_weight(self) -> torch.Tensor:
        w = self.weight.detach().float()
        return w if self.input_shift is None else w * torch.exp2(-self.input_shift)

    def freeze(self, on_grid: bool = False):
        super().freeze(on_grid)
        self.input_scale = None if self.input_shift is None else torch.exp2(self.input_shift).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is not None:
            x = self.input_transform(x)
        if not self.quantize:
            return F.linear(x, self.full_precision_weight(), self.bias)
        if self.input_scale is not None:
            x = x * self.input_scale
        if self.act_quantizer is not None:
            x = self.act_quantizer(x)
        return F.linear(x, self.quantized_weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, quantize={self.quantize}"


class QuantEmbedding(_FrozenWeight):
    """An embedding lookup into a fake-quantized copy of the table, times `output_scale` if the model scales
    its embeddings (Gemma: sqrt(hidden), applied in the table's dtype as the model does)."""

    def __init__(self, embedding: nn.Embedding, output_scale: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("output_scale", output_scale, persistent=False)
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.weight = embedding.weight
        self.weight_quantizer: nn.Module | None = None
        self.register_buffer("quantized_weight", None, persistent=False)
        self.quantize = False

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        table = self.quantized_weight if self.quantize else self.full_precision_weight()
        out = F.embedding(ids, table, self.padding_idx)
        return out if self.output_scale is None else out * self.output_scale.to(table.dtype)
