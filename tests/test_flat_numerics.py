"""FlatQuant numerics: Kronecker factorisation, exact inversion of both parameterisations, the dynamic
quantizers' grids and straight-through gradients, and the K/V transforms."""
import pytest
import torch

from quant_layers import FPFormat, fp_quantize
from quant_layers.flat import FlatLinear, KVQuant, heads_apply
from quant_layers.learnable import DynamicQuantizer, WeightClip
from quant_layers.transforms import (DirectFactor, KroneckerTransform, OrthoDiagFactor, kron_apply,
                                     kronecker_factors)


@pytest.mark.parametrize("n, pair", [(2048, (32, 64)), (3584, (56, 64)), (4096, (64, 64)), (5120, (64, 80)),
                                     (8192, (64, 128)), (11008, (86, 128)), (13824, (108, 128)),
                                     (14336, (112, 128)), (18944, (128, 148)), (27648, (144, 192)),
                                     (28672, (128, 224)), (576, (24, 24)), (1536, (32, 48))])
def test_kronecker_factors_match_the_reference_rule(n, pair):
    assert kronecker_factors(n) == pair


@pytest.mark.parametrize("n, pair", [(6, (2, 3)), (18, (3, 6)), (4994, (22, 227)), (2 * 10007, (2, 10007)),
                                     (13, (1, 13)), (896, (28, 32)), (4864, (64, 76))])
def test_kronecker_factors_of_awkward_sizes_end(n, pair):
    # n = 2 (mod 4) has no (a-b)(a+b) form (the reference loops forever): closest divisor pair; a prime is 1 x n
    assert kronecker_factors(n) == pair


def test_kron_apply_equals_the_materialised_kronecker_product():
    g = torch.Generator().manual_seed(0)
    p1, p2 = torch.randn(3, 3, generator=g, dtype=torch.float64), torch.randn(5, 5, generator=g, dtype=torch.float64)
    x = torch.randn(7, 15, generator=g, dtype=torch.float64)
    torch.testing.assert_close(kron_apply(x, p1, p2), x @ torch.kron(p1, p2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kron_apply(x, p1, None), x @ torch.kron(p1, torch.eye(5, dtype=torch.float64)))


def _perturbed_transform(direct: bool, diag: bool, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = DirectFactor if direct else OrthoDiagFactor
    transform = KroneckerTransform(make(4, g), make(6, g), 24, diag=diag)
    with torch.no_grad():  # move every parameter away from its start, as training would
        for p in transform.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return transform


@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("diag", [False, True])
def test_transform_is_exactly_inverted_on_the_weight_side(direct, diag):
    transform = _perturbed_transform(direct, diag)
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(10, 24, generator=g), torch.randn(8, 24, generator=g)
    with torch.no_grad():
        out = transform(x) @ transform.weight_side(w).T
    torch.testing.assert_close(out, x @ w.T, rtol=1e-4, atol=1e-4)
    for factor in (transform.left, transform.right):
        eye = torch.eye(factor.matrix().shape[0])
        torch.testing.assert_close(factor.matrix().detach().T @ factor.inverse_t().detach(), eye, atol=1e-5, rtol=0)


def test_orthogonal_times_diagonal_keeps_u_and_v_orthogonal():
    factor = _perturbed_transform(direct=False, diag=False).left
    u, v = factor._uv()
    torch.testing.assert_close(u.T @ u, torch.eye(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(v.T @ v, torch.eye(4), atol=1e-5, rtol=0)
    assert not torch.allclose(factor.sigma, torch.ones(4))


def test_frozen_transform_keeps_the_online_part_only():
    transform = _perturbed_transform(direct=False, diag=True)
    x = torch.randn(3, 24)
    with torch.no_grad():
        expected = kron_apply(x, transform.left.matrix(), transform.right.matrix())
        torch.testing.assert_close(transform.frozen()(x), expected)
        transform.right_online = False
        torch.testing.assert_close(transform.frozen()(x), kron_apply(x, transform.left.matrix(), None))


def test_int4_symmetric_dynamic_uses_levels_minus8_to_7_per_token():
    q = DynamicQuantizer(4, symmetric=True)
    x = torch.tensor([[7.0, -8.0, 3.2, 0.4], [0.7, 0.42, -0.1, 0.0]])
    out = q(x)
    # scale = absmax / 7 per token: the first token's scale is 8/7
    torch.testing.assert_close(out[0] / (8 / 7), torch.tensor([6.0, -7.0, 3.0, 0.0]))
    torch.testing.assert_close(out[1] / 0.1, torch.tensor([7.0, 4.0, -1.0, 0.0]), atol=1e-5, rtol=0)
    y = torch.tensor([[-7.0, 1.0]])
    assert q(y)[0, 0] == -7.0  # -8 is reachable only below -absmax, which clipping never produces here


def test_int_asymmetric_groups_cover_each_group_range():
    q = DynamicQuantizer(4, symmetric=False, groupsize=2)
    x = torch.tensor([[0.0, 15.0, -3.0, 0.0]])
    torch.testing.assert_close(q(x), x)  # each group's range is exactly 15 steps or holds only grid points
    with pytest.raises(ValueError, match="group size 3"):
        DynamicQuantizer(4, symmetric=False, groupsize=3)(x)


def test_fp_dynamic_quantizer_equals_fp_quantize_at_the_token_minmax_bias():
    fmt = FPFormat(2, 1)
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(3)) * 3
    expected = fp_quantize(x, fmt, fmt.bias_for_maxval(x.abs().amax(-1, keepdim=True)))
    torch.testing.assert_close(DynamicQuantizer(fmt)(x), expected, rtol=1e-6, atol=1e-6)


def test_straight_through_rounding_passes_gradients_to_inputs_and_clip_ratios():
    q = DynamicQuantizer(4, symmetric=True, clip="scalar")
    x = torch.randn(4, 8, requires_grad=True)
    q(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert q.clip_max.grad is not None and q.clip_max.grad != 0
    clip = WeightClip(3)
    w = torch.randn(3, 5)
    clip(w).sum().backward()
    assert clip.clip_max.grad.abs().sum() > 0 and clip.clip_min.grad.abs().sum() > 0


def test_weight_clip_starts_just_inside_each_rows_range():
    w = torch.tensor([[-2.0, 1.0, 4.0]])
    out = WeightClip(1)(w).detach()
    ratio = torch.sigmoid(torch.tensor(4.0))
    torch.testing.assert_close(out, torch.tensor([[-2.0 * ratio, 1.0, 4.0 * ratio]]))


def test_key_transform_preserves_attention_scores():
    g = torch.Generator().manual_seed(0)
    factor = DirectFactor(8, g)
    with torch.no_grad():
        factor.weight.add_(0.3 * torch.randn(8, 8, generator=g))
    q, k, v = (torch.randn(1, 2, 5, 8, generator=g) for _ in range(3))
    kv = KVQuant(factor)
    with torch.no_grad():
        q2, k2, v2 = kv(q, k, v)
    torch.testing.assert_close(q2 @ k2.transpose(-1, -2), q @ k.transpose(-1, -2), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(v2, v)


def test_flat_linear_without_quantizers_is_the_original_linear_up_to_its_output_heads():
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(24, 8, bias=True)
    transform = _perturbed_transform(direct=True, diag=True, seed=2)
    head_factor = DirectFactor(4, g)
    flat = FlatLinear(linear, transform, out_factor=head_factor)
    flat.quantize = False
    x = torch.randn(5, 24, generator=g)
    with torch.no_grad():
        expected = heads_apply(linear(x), head_factor.matrix())
        torch.testing.assert_close(flat(x), expected, rtol=1e-4, atol=1e-4)
        w, b = flat.folded()
        torch.testing.assert_close((transform(x).double() @ w.T + b).float(), expected, rtol=1e-4, atol=1e-4)
