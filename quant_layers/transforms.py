"""FlatQuant's learnable affine transforms (spec A.2), applied without materialising them.

A transform P acts on activations as x -> (x * s) P and on the weights that read them as
W -> (W / s) P^-T, so the layer output is unchanged in exact arithmetic. P = P1 (x) P2 is Kronecker-factored:
a token row viewed as an n1 x n2 matrix X becomes P1^T X P2, O(n (n1 + n2)) per token instead of O(n^2).

Each factor is either "orthogonal times diagonal" (U diag(sigma) V^T with U, V kept orthogonal through a
Cayley map; its inverse-transpose is closed-form U diag(1/sigma) V^T) or "direct" (an unconstrained matrix
inverted in float64 at every use). Both start at a random orthogonal matrix.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def kronecker_factors(n: int) -> tuple[int, int]:
    """(n1, n2) with n1 * n2 = n and n1 <= n2, near sqrt(n).

    The reference's rule writes n = (a - b)(a + b) with the smallest a >= sqrt(n) (so its released matrices
    reload here). That rule never ends for n = 2 (mod 4), where no such pair exists: there the closest
    divisor pair is used. A prime n gives (1, n): one dense n x n factor, which costs n^2 per token.
    """
    if n < 1:
        raise ValueError(f"a transform needs a positive size, got {n}")
    if n % 4 == 2:
        small = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
        return small, n // small
    a = math.isqrt(n - 1) + 1 if n > 1 else 1
    while True:
        b = math.isqrt(a * a - n)
        if b * b == a * a - n:
            return a - b, a + b
        a += 1


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random orthogonal matrix (QR of a Gaussian with the signs of R's diagonal fixed)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


class OrthoDiagFactor(nn.Module):
    """P = U diag(sigma) V^T; U = U0 cayley(A), V = V0 cayley(B) with skew A, B starting at zero."""

    def __init__(self, n: int, generator: torch.Generator):
        super().__init__()
        self.register_buffer("u0", random_orthogonal(n, generator))
        self.register_buffer("v0", random_orthogonal(n, generator))
        self.u_skew = nn.Parameter(torch.zeros(n, n))
        self.v_skew = nn.Parameter(torch.zeros(n, n))
        self.sigma = nn.Parameter(torch.ones(n))

    @staticmethod
    def _cayley(param):
        skew = param - param.T
        eye = torch.eye(skew.shape[0], dtype=skew.dtype, device=skew.device)
        return torch.linalg.solve(eye + skew, eye - skew)

    def _uv(self):
        return self.u0 @ self._cayley(self.u_skew), self.v0 @ self._cayley(self.v_skew)

    def matrix(self):
        u, v = self._uv()
        return (u * self.sigma) @ v.T

    def inverse_t(self):
        u, v = self._uv()
        return (u / self.sigma) @ v.T


class DirectFactor(nn.Module):
    """An unconstrained matrix; its inverse-transpose comes from a float64 inverse."""

    def __init__(self, n: int, generator: torch.Generator):
        super().__init__()
        self.weight = nn.Parameter(random_orthogonal(n, generator))

    def matrix(self):
        return self.weight

    def inverse_t(self):
        return torch.linalg.inv(self.weight.double()).T.to(self.weight.dtype)


class FixedFactor(nn.Module):
    """A factor frozen to an explicit float32 matrix (the one applied online). Its inverse-transpose is
    computed once in float64 from that very matrix, so folding it into the weights is exact to float64."""

    def __init__(self, matrix: torch.Tensor):
        super().__init__()
        self.register_buffer("fixed", matrix.detach().float().clone())
        self.register_buffer("fixed_inverse_t", torch.linalg.inv(self.fixed.double()).T.contiguous())

    def matrix(self):
        return self.fixed

    def inverse_t(self):
        return self.fixed_inverse_t


def freeze_factor(factor: nn.Module) -> FixedFactor:
    return factor if isinstance(factor, FixedFactor) else FixedFactor(factor.matrix())


def make_factor(n: int, direct: bool, generator: torch.Generator) -> nn.Module:
    return (DirectFactor if direct else OrthoDiagFactor)(n, generator)


def kron_apply(x: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None) -> torch.Tensor:
    """x (P1 (x) P2) for rows x [..., n1 * n2]: view each row as n1 x n2, compute P1^T X P2. A factor given
    as None is the identity."""
    n1 = left.shape[0] if left is not None else x.shape[-1] // right.shape[0]
    tiles = x.reshape(*x.shape[:-1], n1, -1)
    if right is not None:
        tiles = tiles @ right.to(x.dtype)
    if left is not None:
        tiles = left.T.to(x.dtype) @ tiles
    return tiles.reshape(x.shape)


class KroneckerTransform(nn.Module):
    """x -> (x * s) (P1 (x) P2), with its weight-side counterpart W -> (W / s)(P1 (x) P2)^-T.

    `right_online=False` marks a right factor that the inputs already carry (o_proj's head_dim factor,
    applied to V through v_proj's weights): the online part is then P1 alone.
    """

    def __init__(self, left: nn.Module, right: nn.Module, size: int, diag: bool = False,
                 right_online: bool = True):
        super().__init__()
        self.left, self.right, self.right_online = left, right, right_online
        self.diag_scale = nn.Parameter(torch.ones(size)) if diag else None

    def forward(self, x):
        if self.diag_scale is not None:
            x = x * self.diag_scale.to(x.dtype)
        return kron_apply(x, self.left.matrix(), self.right.matrix() if self.right_online else None)

    def weight_side(self, weight: torch.Tensor) -> torch.Tensor:
        if self.diag_scale is not None:
            weight = weight / self.diag_scale.to(weight.dtype)
        return kron_apply(weight, self.left.inverse_t(), self.right.inverse_t())

    def frozen(self) -> "KroneckerTransform":
        """The online part as fixed matrices, for inference after the diagonal scale is folded elsewhere."""
        left, right = freeze_factor(self.left), freeze_factor(self.right)
        return KroneckerTransform(left, right, 0, diag=False, right_online=self.right_online).requires_grad_(False)

    def extra_repr(self):
        n1, n2 = self.left.matrix().shape[0], self.right.matrix().shape[0]
        return f"{n1} x {n2}, diag={self.diag_scale is not None}, right_online={self.right_online}"
