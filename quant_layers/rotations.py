"""A fixed block-diagonal Hadamard rotation of the block size (MR-GPTQ's cheap alternative to learned transforms):
inputs x -> x H and the weights that read them W -> W H, with H orthonormal and symmetric, so x' W'^T = x W^T
in exact arithmetic. Mixing the elements inside each quantization block spreads an outlier over its block."""
from __future__ import annotations

import math

import torch
from torch import nn


def hadamard(n: int) -> torch.Tensor:
    """The n x n Sylvester Hadamard matrix divided by sqrt(n) (n a power of two): orthonormal and symmetric."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two size, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h / math.sqrt(n)


class BlockHadamard(nn.Module):
    """x [..., n] -> each consecutive block of `size` elements times the size x size Hadamard matrix."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size
        self.register_buffer("matrix", hadamard(size), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.size:
            raise ValueError(f"a Hadamard rotation of {self.size} does not divide the last dimension {x.shape[-1]}")
        blocks = x.unflatten(-1, (x.shape[-1] // self.size, self.size))
        return (blocks @ self.matrix.to(x.dtype)).flatten(-2)

    def extra_repr(self) -> str:
        return f"blocks of {self.size}"
