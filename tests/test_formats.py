import math

import pytest
import torch

from quant_layers import FPFormat, FPQuantizer, fp_formats, fp_grid, fp_quantize
from quant_layers.formats import int_quantize_symmetric

ALL_VALUES = torch.linspace(-1.5, 1.5, 300001, dtype=torch.float64)


def quantized_set(fmt, bias):
    return torch.unique(fp_quantize(ALL_VALUES, fmt, bias))


@pytest.mark.parametrize("fmt, positives", [
    (FPFormat(2, 1), [0, 1 / 12, 1 / 6, 1 / 4, 1 / 3, 1 / 2, 2 / 3, 1]),
    (FPFormat(1, 2), [k / 7 for k in range(8)]),
    (FPFormat(3, 0), [0] + [2.0 ** -k for k in range(6, -1, -1)]),
])
def test_4bit_grids_at_minmax_bias_of_absmax_one(fmt, positives):
    bias = fmt.bias_for_maxval(1.0)
    values = quantized_set(fmt, bias)
    assert values.numel() == 15
    expected = torch.tensor(sorted({-p for p in positives} | set(positives)), dtype=torch.float64)
    torch.testing.assert_close(values, expected, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(fp_grid(fmt, bias), torch.tensor(positives, dtype=torch.float64), rtol=1e-12, atol=0)


def test_e2m1_minmax_bias_value():
    assert FPFormat(2, 1).bias_for_maxval(1.0) == pytest.approx(4 + math.log2(1.5) - 1)
    assert FPFormat(2, 1).bias_for_maxval(1.0) == pytest.approx(3.5849625007)


@pytest.mark.parametrize("bits", [4, 5, 6, 8])
def test_maxval_and_bias_round_trip(bits):
    for fmt in fp_formats(bits):
        for maxval in (1e-3, 0.37, 1.0, 12.0, 3000.0):
            bias = fmt.bias_for_maxval(maxval)
            assert fmt.maxval(bias) == pytest.approx(maxval, rel=1e-12)
            assert fp_quantize(torch.tensor([maxval * 5], dtype=torch.float64), fmt, bias).item() == \
                pytest.approx(maxval, rel=1e-12)


def test_scale_equivariance_under_the_bias():
    x = torch.randn(5000, dtype=torch.float64) * 3
    for fmt in fp_formats(4) + fp_formats(8):
        for bias in (-2.3, 0.7, 3.585, 9.1):
            lhs = fp_quantize(x, fmt, bias)
            rhs = 2.0 ** -bias * fp_quantize(2.0 ** bias * x, fmt, 0.0)
            torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-300)


def test_integer_shift_identity():
    x = torch.randn(5000, dtype=torch.float64) * 5
    for fmt in fp_formats(4):
        for rho in (0.25, 1.7, -3.4):
            for k in range(fmt.max_exponent_code + 1):
                lhs = fp_quantize(x, fmt, rho + k)
                rhs = 2.0 ** -k * fp_quantize(2.0 ** k * x, fmt, rho)
                torch.testing.assert_close(lhs, rhs, rtol=1e-14, atol=0)  # same grid point, up to an ulp


@pytest.mark.parametrize("bits", [3, 4, 5, 6, 8])
def test_e1_format_equals_symmetric_int(bits):
    x = torch.randn(20000, dtype=torch.float64) * 2
    absmax = x.abs().max()
    fmt = FPFormat(1, bits - 2)
    fp = fp_quantize(x, fmt, fmt.bias_for_maxval(absmax))
    integer = int_quantize_symmetric(x, bits, absmax / (2 ** (bits - 1) - 1))
    torch.testing.assert_close(fp, integer, rtol=1e-12, atol=1e-12)


def test_round_half_to_even_on_the_step_grid():
    fmt = FPFormat(1, 2)  # step 1 at bias log2(1.75)+1-... : use bias 0 -> subnormal step 2^-1
    values = torch.tensor([0.25, 0.75, 1.25], dtype=torch.float64)  # exact midpoints of step 0.5 near 0
    assert fp_quantize(values, fmt, 0.0).tolist() == [0.0, 1.0, 1.0]


def test_format_spaces():
    assert [f.name for f in fp_formats(4)] == ["E3M0", "E2M1", "E1M2"]
    assert [f.name for f in fp_formats(8)] == ["E7M0", "E6M1", "E5M2", "E4M3", "E3M4", "E2M5", "E1M6"]
    assert [f.name for f in fp_formats(8, "reference")] == ["E5M2", "E4M3", "E3M4", "E2M5", "E1M6"]
    for bits in range(2, 9):
        assert all(f.bits == bits for f in fp_formats(bits))
    with pytest.raises(ValueError):
        FPFormat.from_bits(4, 4)


def test_zero_rows_and_channels_quantize_to_zero():
    w = torch.randn(6, 8)
    w[2] = 0
    w[:, 3] = 0
    for granularity in ("tensor", "row", "channel", "token"):
        q = FPQuantizer.minmax(w, FPFormat(2, 1), granularity)(w)
        assert torch.isfinite(q).all()
        assert (q[2] == 0).all() and (q[:, 3] == 0).all()


@pytest.mark.parametrize("numerics", ["paper", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_static_quantizer_keeps_its_terms_and_equals_fp_quantize(numerics, dtype):
    """A static quantizer computes its bias's terms once; every call still equals fp_quantize bit for bit,
    also after the bias is changed in place, replaced, or the input dtype changes."""
    fmt = FPFormat(2, 1, numerics)
    torch.manual_seed(0)
    x = (torch.randn(4, 64) * torch.logspace(-3, 2, 64)).to(dtype)
    q = FPQuantizer(fmt, torch.tensor(fmt.bias_for_maxval(3.0)))
    for change in (lambda: None, lambda: q.bias.add_(0.37), lambda: setattr(q, "bias", torch.tensor(-1.25))):
        change()
        for _ in range(2):
            assert torch.equal(q(x), fp_quantize(x, fmt, q.bias).to(dtype))
    assert torch.equal(q(x.double()), fp_quantize(x.double(), fmt, q.bias))


def test_bias_made_under_inference_mode_is_used_as_it_is():
    fmt, x = FPFormat(2, 1), torch.randn(3, 8)
    with torch.inference_mode():  # an inference tensor has no version counter to keep terms by
        q = FPQuantizer(fmt, torch.tensor(0.5))
        assert torch.equal(q(x), fp_quantize(x, fmt, 0.5))
