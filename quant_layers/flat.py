"""FlatQuant's trainable layers (spec A.3-A.6): a linear with an input transform, learnable clipping and
straight-through quantizers, and the query/key/value quantization of the KV cache.

`FlatLinear` exists only during calibration; `folded()` then gives the weight with every transform and
clip put in (float64), which the calibration driver quantizes (RTN, GPTQ or the FPQ search) into a
`QuantLinear` that keeps only the online part of the input transform.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .transforms import KroneckerTransform, freeze_factor


def heads_apply(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """x [..., heads * d] with every head's d-vector multiplied by `matrix` [d, d] on the right."""
    d = matrix.shape[0]
    return (x.reshape(*x.shape[:-1], -1, d) @ matrix.to(x.dtype)).reshape(x.shape)


class FlatLinear(nn.Module):
    """y = Qa(T(x)) Qw(clip(W'))^T + b' where W' = (heads transform of W's outputs) T^-T.

    `in_transform` and `act_quantizer` may be shared by linears that read the same input (q/k/v, up/gate):
    the input is transformed and quantized the same way for all of them, as one kernel would do it.
    `out_factor` (v_proj) multiplies each output head by a head_dim x head_dim factor, so V reaches the
    cache already transformed.
    """

    def __init__(self, linear: nn.Linear, in_transform: KroneckerTransform | None = None,
                 act_quantizer: nn.Module | None = None, weight_quantizer: nn.Module | None = None,
                 weight_clip: nn.Module | None = None, out_factor: nn.Module | None = None):
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.in_transform, self.act_quantizer = in_transform, act_quantizer
        self.weight_quantizer, self.weight_clip, self.out_factor = weight_quantizer, weight_clip, out_factor
        self.quantize = True

    def transformed(self, dtype=torch.float32):
        """(W', b') in `dtype`: the output-head and input transforms applied, nothing clipped or quantized."""
        w = self.weight.to(dtype)
        b = None if self.bias is None else self.bias.to(dtype)
        if self.out_factor is not None:
            # each head's rows W_h become P^T W_h, so the head's outputs x W_h^T become (x W_h^T) P
            factor = self.out_factor.matrix().to(dtype)
            w = heads_apply(w.T, factor).T
            b = None if b is None else heads_apply(b, factor)
        if self.in_transform is not None:
            w = self.in_transform.weight_side(w)
        return w, b

    def folded(self):
        """(weight, bias) of the deployable linear in float64: transforms and the learned clip put in."""
        with torch.no_grad():
            w, b = self.transformed(torch.float64)
            if self.weight_clip is not None:
                w = self.weight_clip(w)
        return w, b

    def forward(self, x):
        if self.in_transform is not None:
            x = self.in_transform(x)
        w, b = self.transformed(x.dtype)
        if self.quantize:
            if self.act_quantizer is not None:
                x = self.act_quantizer(x)
            if self.weight_clip is not None:
                w = self.weight_clip(w)
            if self.weight_quantizer is not None:
                w = self.weight_quantizer(w)
        return F.linear(x, w, b)


class KVQuant(nn.Module):
    """Query/key/value fake quantization inside attention, after RoPE (spec A.3/A.4).

    With `key_factor` P_k the keys become K P_k and the queries Q P_k^-T (Q K^T unchanged), then each
    is quantized in groups along head_dim. Tensors are [batch, heads, tokens, head_dim].
    """

    def __init__(self, key_factor: nn.Module | None = None, q_quantizer: nn.Module | None = None,
                 k_quantizer: nn.Module | None = None, v_quantizer: nn.Module | None = None):
        super().__init__()
        self.key_factor = key_factor
        self.q_quantizer, self.k_quantizer, self.v_quantizer = q_quantizer, k_quantizer, v_quantizer
        self.quantize = True

    def forward(self, query, key, value):
        if self.key_factor is not None:
            query = query @ self.key_factor.inverse_t().to(query.dtype)
            key = key @ self.key_factor.matrix().to(key.dtype)
        if self.quantize:
            quant = lambda q, x: x if q is None else q(x)  # noqa: E731
            query, key, value = quant(self.q_quantizer, query), quant(self.k_quantizer, key), quant(self.v_quantizer, value)
        return query, key, value

    def frozen(self) -> "KVQuant":
        factor = None if self.key_factor is None else freeze_factor(self.key_factor)
        return KVQuant(factor, self.q_quantizer, self.k_quantizer, self.v_quantizer).requires_grad_(False)
