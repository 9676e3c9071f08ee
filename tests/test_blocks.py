"""Block-scaled formats (quant_layers.blocks): bit for bit what compressed-tensors computes for its MX and NVFP4
presets, the OCP element grids, the E8M0 scale rules, codes, saved quantizers and refusals."""
import json
import math

import pytest
import torch
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.quant_args import DynamicType
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4
from compressed_tensors.quantization.utils.fp6_utils import cast_to_fp6
from compressed_tensors.quantization.utils.helpers import (calculate_qparams, compute_dynamic_scales_and_zp,
                                                           generate_gparam)
from compressed_tensors.quantization.utils.mxfp_utils import generate_mx_scales

from quant_layers.blocks import BlockQuantizer, blocks_of, element_quantize, mx_scale_codes
from quant_layers.formats import FPFormat
from quant_layers.quantizers import quantizer_from_state, quantizer_to_state
from quant_layers.schemes import IntElement, Scheme, make_quantizer

E2M1, E2M3, E3M2, E4M3, E5M2 = FPFormat(2, 1), FPFormat(2, 3), FPFormat(3, 2), FPFormat(4, 3), FPFormat(5, 2)
# largest value and floor(log2(largest value)) of each OCP element, written out from the OCP tables
TOP = {E2M1: 6.0, E2M3: 7.5, E3M2: 28.0, E4M3: 448.0, E5M2: 57344.0}
OFFSET = {E2M1: 2, E2M3: 2, E3M2: 4, E4M3: 8, E5M2: 15}
CT_ELEMENT = {4: E2M1, 6: E2M3, 8: E4M3}  # compressed-tensors' FLOAT element of each width
CT_ENCODING = {torch.uint8: "e8m0", torch.float8_e4m3fn: "e4m3"}
RULES = ("even", "floor", "ceil")


def block_presets() -> dict:
    """{"PRESET.role": args} for every operand of a compressed-tensors preset that has block scales (E8M0 or
    E4M3), each distinct argument set once."""
    found, seen = {}, set()
    for name, scheme in PRESET_SCHEMES.items():
        for role in ("weights", "input_activations"):
            args = scheme.get(role)
            if args is not None and args.scale_dtype in CT_ENCODING and args.model_dump_json() not in seen:
                seen.add(args.model_dump_json())
                found[f"{name}.{role}"] = args
    return found


PRESETS = block_presets()
STATIC = [name for name, args in PRESETS.items() if not args.dynamic]
DYNAMIC = [name for name, args in PRESETS.items() if args.dynamic]


def scheme_of(args) -> Scheme:
    """Our scheme for compressed-tensors' args. DynamicType.LOCAL (NVFP4 activations) is block scales per input
    with the calibrated (static) tensor scale, our dynamic E4M3 default."""
    return Scheme(CT_ELEMENT[args.num_bits], "group", args.group_size, CT_ENCODING[args.scale_dtype],
                  args.dynamic in (True, DynamicType.LOCAL))


def assert_same(ours: torch.Tensor, reference: torch.Tensor):
    """Same type, shape and values, NaN nowhere. -0 equals +0 here, the only bits that differ: compressed-tensors
    turns some -0 into +0 (it adds its zero point, 0, to x / scale, which may be an input -0 or a quotient that
    underflowed; its E2M1 rounding multiplies by sign(-0) = 0), where ours keeps the sign; no product sees it."""
    assert ours.dtype == reference.dtype and ours.shape == reference.shape
    assert not ours.isnan().any()
    mismatched = (ours != reference).nonzero()
    assert torch.equal(ours, reference), f"{len(mismatched)} values differ, first at {mismatched[:3].tolist()}"


def ct_static(x: torch.Tensor, args):
    """compressed-tensors' weight path as llm-compressor's min-max observer drives it: (block scales, global
    scale or None, fake-quantized x), the global scale from the tensor's minimum and maximum."""
    global_scale = generate_gparam(x.min(), x.max()) if args.strategy == "tensor_group" else None
    return ct_static_with(x, args, global_scale)


def ct_static_with(x: torch.Tensor, args, global_scale):
    blocks = x.unflatten(-1, (-1, args.group_size))
    scale, zero = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args, global_scale=global_scale)
    return scale, global_scale, fake_quantize(x, scale, zero, args, global_scale=global_scale)


def ct_dynamic(x: torch.Tensor, args, global_scale=None):
    """compressed-tensors' dynamic activation path: (block scales, fake-quantized x)."""
    scale, zero = compute_dynamic_scales_and_zp(x, args, module=None, global_scale=global_scale)
    return scale, fake_quantize(x, scale, zero, args, global_scale=global_scale)


def check_static(x: torch.Tensor, args):
    quantizer = make_quantizer(scheme_of(args), x)
    scale, global_scale, expected = ct_static(x, args)
    assert_same(quantizer.scale, scale.float())  # compressed-tensors keeps MX scales in the input's type
    if global_scale is None:
        assert quantizer.tensor_scale is None
    else:
        assert_same(quantizer.tensor_scale.reshape(1), global_scale)
    assert_same(quantizer(x), expected)


# ---- inputs ----

def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def with_outliers(rows=16, cols=128, seed=0) -> torch.Tensor:
    x = torch.randn(rows, cols, generator=generator(seed))
    picks = torch.randint(0, rows * cols, (12,), generator=generator(seed + 1))
    x.view(-1)[picks] *= 300  # outliers, a few per tensor as in LLM weights and activations
    x[3, 32:64] *= 1e-3  # and quiet blocks next to them
    return x


def with_zero_blocks(seed=2) -> torch.Tensor:
    x = with_outliers(seed=seed)
    x[0, :32] = 0
    x[:, 64:96] = 0  # a zero block in every row
    x[5] = 0  # a whole zero row
    return x


def magnitude_ladder(seed=3) -> torch.Tensor:
    """Rows whose magnitudes climb by 2^9 every 32 columns from the float32 subnormals (2^-148) to 2^122 (the
    largest value 3 * 2^122, below 2^127 * 1.75 where compressed-tensors' E8M0 code overflows, see
    test_e8m0_saturates_at_the_top), and a row of 1e-30: E8M0 codes from the clamp at 0 to 249, and NVFP4 blocks
    whose E4M3 scales underflow to the zero stand-in 0.125."""
    exponents = torch.arange(-148, 125, 9).float()  # 31 blocks
    x = torch.randn(4, 32 * len(exponents), generator=generator(seed)).clamp(-3, 3)
    x = x * torch.exp2(exponents).repeat_interleave(32)
    return torch.cat([x, torch.randn(1, x.shape[1], generator=generator(seed + 1)) * 1e-30])


def nvfp4_scale_ladder(seed=4) -> torch.Tensor:
    """Ordinary values with the tensor maximum in one block: the other blocks' E4M3 scales are spread from 448
    down through the E4M3 subnormals (2^-9 * 2^k) and underflow, which compressed-tensors stores as 0.125."""
    x = torch.randn(8, 256, generator=generator(seed))
    x[0, 0] = 1000.0
    x = x * torch.exp2(-torch.arange(16).float()).repeat_interleave(16)  # one factor per block of 16
    x[1] *= 2.0 ** -12
    return x


def midpoints(fmt: FPFormat) -> torch.Tensor:
    grid = ocp_grid(fmt)
    return (grid[1:] + grid[:-1]) / 2


def ties(fmt: FPFormat, block_size: int, encoding: str, seed=5) -> torch.Tensor:
    """Blocks of element midpoints and element values times a step, each block holding the element's top value
    so that the step is its scale: 2^k (E8M0; for E4M3 the "even" rule takes 2^(k+1), which halves the values:
    midpoints of the binade below), or s / g with g = 2^m and s an E4M3 value (NVFP4: the tensor maximum
    448 * 6 * 2^-m fixes g = 2^m). test_ties_input_holds_midpoints checks that the ties are there."""
    gen = generator(seed)
    values = torch.cat([midpoints(fmt), ocp_grid(fmt)]).float()
    rows, blocks = 6, 4
    picks = torch.randint(0, len(values), (rows, blocks, block_size), generator=gen)
    elements = values[picks]
    elements[..., 0] = TOP[fmt]
    elements *= torch.where(torch.rand(elements.shape, generator=gen) < 0.5, -1.0, 1.0)
    if encoding == "e8m0":
        steps = torch.exp2(torch.randint(-20, 20, (rows, blocks, 1), generator=gen).float())
    else:
        e4m3 = ocp_grid(E4M3).float()
        steps = e4m3[torch.randint(1, len(e4m3), (rows, blocks, 1), generator=gen)] * 2.0 ** -10
        steps[0, 0] = 448.0 * 2.0 ** -10
    return (elements * steps).flatten(-2)


def inputs(fmt: FPFormat, block_size: int, encoding: str) -> dict:
    return {"outliers": with_outliers(), "zero blocks": with_zero_blocks(), "magnitudes": magnitude_ladder(),
            "e4m3 scale range": nvfp4_scale_ladder(), "ties": ties(fmt, block_size, encoding)}


# ---- 1. compressed-tensors, bit for bit ----

def test_presets_covered():
    """Every block-scaled preset operand of compressed-tensors is one of our schemes (E8M0 <-> group, E4M3 <->
    tensor_group): NVFP4 weights and activations, MXFP4, MXFP6 (E2M3) weights, MXFP8 (E4M3) weights and
    activations."""
    kinds = {(scheme_of(args).element, scheme_of(args).scale, scheme_of(args).dynamic) for args in PRESETS.values()}
    assert kinds == {(E2M1, "e4m3", False), (E2M1, "e4m3", True), (E2M1, "e8m0", False), (E2M1, "e8m0", True),
                     (E2M3, "e8m0", False), (E4M3, "e8m0", False), (E4M3, "e8m0", True)}
    for args in PRESETS.values():
        scheme = scheme_of(args)
        assert args.strategy == {"e8m0": "group", "e4m3": "tensor_group"}[scheme.scale]
        assert (args.group_size, args.symmetric) == ({"e8m0": 32, "e4m3": 16}[scheme.scale], True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset", STATIC)
def test_static_weights_match_compressed_tensors(preset, dtype):
    args = PRESETS[preset]
    scheme = scheme_of(args)
    for name, x in inputs(scheme.element, scheme.group_size, scheme.scale).items():
        try:
            check_static(x.to(dtype), args)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from None


def activations(seed=6) -> torch.Tensor:
    """[batch, tokens, hidden] with an outlier channel, a zero token and a tiny token."""
    x = torch.randn(2, 7, 128, generator=generator(seed))
    x[..., 5] *= 40
    x[0, 1] = 0
    x[1, 2] *= 1e-30
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset", DYNAMIC)
def test_dynamic_activations_match_compressed_tensors(preset, dtype):
    """3-d inputs; NVFP4's global scale calibrated on other inputs (llm-compressor's static_minmax observer) and
    exceeded by these, so that block scales saturate at 448."""
    args = PRESETS[preset]
    calibration = (torch.randn(3, 5, 128, generator=generator(7)) * 2).to(dtype)
    x = activations().to(dtype)
    quantizer = make_quantizer(scheme_of(args), calibration)
    global_scale = None
    if args.strategy == "tensor_group":
        global_scale = generate_gparam(calibration.min(), calibration.max())
        assert_same(quantizer.tensor_scale.reshape(1), global_scale)
    scale, expected = ct_dynamic(x, args, global_scale)
    assert_same(quantizer.scales(blocks_of(x, args.group_size))[0], scale.float())
    assert_same(quantizer(x), expected)
    if global_scale is not None:
        assert (scale == 448).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nvfp4_dynamic_tensor_scale_matches_compressed_tensors(dtype):
    """Without a calibrated tensor scale each input's own maximum gives it (generate_gparam of that input)."""
    args = PRESET_SCHEMES["NVFP4"]["input_activations"]
    quantizer = make_quantizer(Scheme(E2M1, "group", 16, "e4m3", dynamic=True, tensor_scale="dynamic"))
    for x in (activations().to(dtype), activations(seed=8).to(dtype) * 1e-3):
        scale, expected = ct_dynamic(x, args, generate_gparam(x.min(), x.max()))
        assert_same(quantizer.scales(blocks_of(x, 16))[0], scale)
        assert_same(quantizer(x), expected)


@pytest.fixture(scope="module")
def smollm2_linears():
    from utils.models import load_model
    model, _ = load_model("smollm2-135m-offline", "float32", "cpu", False)
    layers = model.model.layers
    return {f"{i}.{name}": getattr(getattr(layers[i], part), name).weight.detach().clone()
            for i in (0, len(layers) - 1)
            for part, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                ("mlp", ("gate_proj", "up_proj", "down_proj")))
            for name in names}


SMOLLM2_ROWS = 96  # compressed-tensors' CPU E2M1 rounding takes about a second per million values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_smollm2_weights_match_compressed_tensors(smollm2_linears, dtype):
    for preset in STATIC:
        for name, weight in smollm2_linears.items():
            try:
                check_static(weight[:SMOLLM2_ROWS].to(dtype), PRESETS[preset])
            except AssertionError as error:
                raise AssertionError(f"{preset} {name}: {error}") from None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_global_scale_matches_compressed_tensors(smollm2_linears, dtype):
    """llm-compressor gives q/k/v (and gate/up) one global scale, the smallest of their own
    (update_fused_layer_weight_global_scales); a shared tensor_scale reproduces fake_quantize with it (taken
    from the whole weights, compared on their first rows)."""
    args = PRESET_SCHEMES["NVFP4"]["weights"]
    for layer in sorted({name.split(".")[0] for name in smollm2_linears}):
        for fused in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            weights = [smollm2_linears[f"{layer}.{name}"].to(dtype) for name in fused]
            own = torch.cat([generate_gparam(w.min(), w.max()) for w in weights])
            shared = own.min().reshape(1)
            assert (own > shared).any()  # the sharing changes some projection's scales
            for weight in weights:
                weight = weight[:SMOLLM2_ROWS]
                quantizer = BlockQuantizer.from_tensor(weight, E2M1, 16, "e4m3", tensor_scale=shared)
                scale, _, expected = ct_static_with(weight, args, shared)
                assert_same(quantizer.scale, scale)
                assert_same(quantizer(weight), expected)


def test_e8m0_saturates_at_the_top():
    """A block maximum of 2^127 * 1.75 or more rounds (the "even" rule) to 2^128: compressed-tensors then stores
    code 255 (NaN in E8M0, a scale of infinity); ours stays at the largest code, 254, a finite scale."""
    amax = torch.tensor([2.0 ** 127 * 1.75, torch.finfo(torch.float32).max])
    assert mx_scale_codes(amax, E2M1, "even").tolist() == [254, 254]
    for rule in RULES:  # an infinite block maximum gets the top code under every rule
        assert mx_scale_codes(torch.tensor([math.inf]), E2M1, rule).tolist() == [254]


# ---- 2. elements ----

def ocp_grid(fmt: FPFormat) -> torch.Tensor:
    """Non-negative values of the OCP element, built from its definition (bias 2^(E-1) - 1; every code a
    number except E4M3's top mantissa at the top exponent and E5M2's top exponent), ascending, float64."""
    bias = 2 ** (fmt.exponent_bits - 1) - 1
    steps = 2 ** fmt.mantissa_bits
    values = [m / steps * 2.0 ** (1 - bias) for m in range(steps)]
    values += [(1 + m / steps) * 2.0 ** (e - bias) for e in range(1, 2 ** fmt.exponent_bits) for m in range(steps)]
    values = [v for v in values if v <= TOP[fmt]]
    return torch.tensor(values, dtype=torch.float64)


def round_to_grid(x: torch.Tensor, fmt: FPFormat) -> torch.Tensor:
    """Nearest grid value, ties to the even code (an even index in the grid), saturating at the top."""
    grid = ocp_grid(fmt)
    magnitude = x.double().abs().clamp(max=TOP[fmt])
    upper = torch.searchsorted(grid, magnitude).clamp(1, len(grid) - 1)
    lower = upper - 1
    below, above = magnitude - grid[lower], grid[upper] - magnitude
    pick = torch.where((above < below) | ((above == below) & (upper % 2 == 0)), upper, lower)
    return torch.copysign(grid[pick], x.double()).float()


def dense_sweep(limit: float) -> torch.Tensor:
    """2^20 evenly spaced values of [-limit, limit] and every float32 in it whose bits are a multiple of 2^10."""
    even = torch.linspace(-limit, limit, 2 ** 20 + 1)
    bits = torch.arange(0, 2 ** 31, 2 ** 10, dtype=torch.int64).int().view(torch.float32)
    bits = bits[bits <= limit]
    return torch.cat([even, bits, -bits])


def around(values: torch.Tensor) -> torch.Tensor:
    """values and their negatives, each with its two float32 neighbours."""
    values = torch.cat([values, -values]).float()
    return torch.cat([values, values.nextafter(torch.tensor(math.inf)), values.nextafter(torch.tensor(-math.inf))])


def float32_bit_sweep() -> torch.Tensor:
    """Every 1021st float32 bit pattern (all exponents, subnormals included), finite ones, both signs."""
    bits = torch.arange(0, 0x7F800000, 1021, dtype=torch.int64).int().view(torch.float32)
    return torch.cat([bits, -bits])


@pytest.mark.parametrize("fmt, reference", [(E2M1, cast_to_fp4), (E2M3, cast_to_fp6)])
def test_small_elements_match_compressed_tensors(fmt, reference):
    x = torch.cat([dense_sweep(8.0), around(midpoints(fmt)), around(ocp_grid(fmt))])
    assert_same(element_quantize(x, fmt), reference(x.clone()))
    assert_same(element_quantize(x, fmt), round_to_grid(x, fmt))


@pytest.mark.parametrize("fmt, dtype", [(E4M3, torch.float8_e4m3fn), (E5M2, torch.float8_e5m2)])
def test_fp8_elements_match_torch(fmt, dtype):
    x = torch.cat([float32_bit_sweep(), around(midpoints(fmt)), around(ocp_grid(fmt))])
    x = torch.cat([x, torch.tensor([1e6, -1e6, 3e38])])
    assert_same(element_quantize(x, fmt), x.clamp(-TOP[fmt], TOP[fmt]).to(dtype).float())


def test_e3m2_matches_its_ocp_grid():
    grid = ocp_grid(E3M2)
    assert (len(grid), grid[1].item(), grid[-1].item()) == (32, 2.0 ** -4, 28.0)
    x = torch.cat([dense_sweep(32.0), around(midpoints(E3M2)), around(grid), float32_bit_sweep()])
    assert_same(element_quantize(x, E3M2), round_to_grid(x, E3M2))


# ---- 3. E8M0 rules ----

def amax_sweep(dtype=torch.float32) -> torch.Tensor:
    """Block maxima around every power of two and every element top times a power of two (each with its
    float32 neighbours), the float32 subnormals, zero; in `dtype`."""
    powers = torch.exp2(torch.arange(-149, 127).double())
    tops = torch.tensor(sorted(set(TOP.values())), dtype=torch.float64)
    anchors = torch.cat([powers, (tops[:, None] * powers[None, :]).flatten()]).float()
    anchors = anchors[anchors > 0]
    up, down = anchors.nextafter(torch.tensor(math.inf)), anchors.nextafter(torch.tensor(0.0))
    amax = torch.cat([torch.zeros(1), anchors, up, down, anchors * 1.3]).to(dtype)
    return amax[amax < 2.0 ** 127 * 1.75]  # see test_e8m0_saturates_at_the_top


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [4, 6, 8])
def test_even_rule_is_compressed_tensors(bits, dtype):
    amax = amax_sweep(dtype)
    expected = generate_mx_scales(amax, bits).float().clamp(0, 255).round()  # uint8 as calculate_qparams stores
    assert_same(mx_scale_codes(amax, CT_ELEMENT[bits], "even"), expected)


def floor_log2(value: float) -> int:
    mantissa, exponent = math.frexp(value)  # value = mantissa * 2^exponent, 0.5 <= mantissa < 1
    return exponent - 1


@pytest.mark.parametrize("fmt", list(TOP))
def test_floor_rule_is_ocp(fmt):
    """2^(floor(log2 amax) - offset), computed exactly in Python, codes clamped to E8M0's 0..254."""
    amax = amax_sweep()
    expected = [0 if a == 0 else min(max(127 + floor_log2(a) - OFFSET[fmt], 0), 254) for a in amax.tolist()]
    assert mx_scale_codes(amax, fmt, "floor").tolist() == expected


@pytest.mark.parametrize("fmt", list(TOP))
def test_ceil_rule_is_the_smallest_power_that_clips_nothing(fmt):
    amax = amax_sweep()
    codes = mx_scale_codes(amax, fmt, "ceil")
    inside = (codes > 0) & (codes < 254)
    assert inside.sum() > 400
    scale = torch.exp2(codes.double() - 127)
    assert (amax.double() / scale <= TOP[fmt])[codes < 254].all()
    assert (amax.double() / (scale / 2) > TOP[fmt])[inside].all()


@pytest.mark.parametrize("fmt", list(TOP))
@pytest.mark.parametrize("rule", RULES)
def test_zero_blocks_get_code_zero_and_zeros(fmt, rule):
    x = with_outliers(rows=4, cols=128)
    x[1, 32:64] = 0
    x[2] = 0
    quantizer = BlockQuantizer.from_tensor(x, fmt, 32, "e8m0", rule=rule)
    assert quantizer.scale[1, 1] == quantizer.scale[2, 0] == 2.0 ** -127  # code 0
    out = quantizer(x)
    assert not out.isnan().any()
    assert (out[1, 32:64] == 0).all() and (out[2] == 0).all()
    dynamic = BlockQuantizer(fmt, 32, "e8m0", dynamic=True, rule=rule)
    assert_same(dynamic(x), out)


def test_nvfp4_zero_tensor_quantizes_to_zeros():
    """All zeros: compressed-tensors' global scale 1 (448 * 6 / tiny is infinite) and block scale 0.125."""
    x = torch.zeros(2, 32)
    quantizer = BlockQuantizer.from_tensor(x, E2M1, 16, "e4m3")
    assert quantizer.tensor_scale.item() == 1.0 and (quantizer.scale == 0.125).all()
    assert_same(quantizer(x), x)
    check_static(x, PRESET_SCHEMES["NVFP4"]["weights"])


# ---- 3b. NVFP4 four over six ----

def test_input_four_over_six_takes_each_blocks_lower_error_mapping():
    """A dynamic NVFP4 input quantizer with four over six: per block, of the E4M3 scale mapping the block maximum
    to 6 (what compressed-tensors computes, checked above) and the one mapping it to 4 (written out here with
    compressed-tensors' own E2M1 rounding), the one whose squared error is lower; a tie keeps 6. Its calibrated
    tensor scale aims the largest block at 256, the same choice the weights' static four over six makes."""
    x = torch.cat([with_outliers(), with_zero_blocks(), magnitude_ladder()[:, :128] * 1e-30])
    scheme = Scheme(E2M1, "group", 16, "e4m3", dynamic=True, four_over_six=True)
    quantizer = make_quantizer(scheme, x)
    g = quantizer.tensor_scale
    assert g.item() == 256.0 * 6.0 / x.abs().amax()
    blocks, amax = blocks_of(x, 16), blocks_of(x, 16).abs().amax(-1, keepdim=True)
    six = blocks_of(BlockQuantizer(E2M1, 16, "e4m3", tensor_scale=g, dynamic=True)(x), 16)
    scale4 = (g * (amax / 4.0)).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    step4 = torch.where(scale4 == 0, 0.125, scale4) / g
    four = cast_to_fp4((blocks / step4).clamp(-6, 6)) * step4
    error6, error4 = [(q - blocks).square().sum(-1, keepdim=True) for q in (six, four)]
    chose_four = error4 < error6
    assert 0.1 < chose_four.float().mean() < 0.9  # both mappings occur
    assert_same(quantizer(x), torch.where(chose_four, four, six).flatten(-2))
    assert_same(BlockQuantizer.four_over_six(x, E2M1, 16, tensor_scale=g)(x), quantizer(x))


def test_four_over_six_tensor_scale_leaves_room_for_the_four_mapping():
    x = with_outliers()
    plain = make_quantizer(Scheme(E2M1, "group", 16, "e4m3", dynamic=True), x)
    adaptive = make_quantizer(Scheme(E2M1, "group", 16, "e4m3", dynamic=True, four_over_six=True), x)
    assert adaptive.tensor_scale.item() == 256.0 * 6.0 / x.abs().amax()
    assert plain.tensor_scale.item() == 448.0 * 6.0 / x.abs().amax()
    largest_block_scale = adaptive.scales(blocks_of(x, 16))[0].amax()
    assert largest_block_scale < 448  # the largest block mapped to 4 would be 384, not saturated
    dynamic = make_quantizer(Scheme(E2M1, "group", 16, "e4m3", dynamic=True, tensor_scale="dynamic",
                                    four_over_six=True))
    assert dynamic.scales(blocks_of(x, 16))[1].item() == adaptive.tensor_scale.item()


# ---- 4. codes ----

def all_quantizers(x: torch.Tensor) -> dict:
    """A quantizer of every kind on x: each MX element with each rule (static and dynamic), NVFP4 static,
    dynamic with x's tensor scale as calibration, and dynamic with a dynamic tensor scale (both also with four
    over six)."""
    found = {}
    for fmt in TOP:
        for rule in RULES:
            for dynamic in (False, True):
                scheme = Scheme(fmt, "group", 32, "e8m0", dynamic, rule)
                found[scheme.name + "/" + rule] = make_quantizer(scheme, x)
    for dynamic, tensor_scale in ((False, ""), (True, "static"), (True, "dynamic")):
        for four_over_six in (False, True) if dynamic else (False,):
            scheme = Scheme(E2M1, "group", 16, "e4m3", dynamic, tensor_scale=tensor_scale, four_over_six=four_over_six)
            found[scheme.name + "/" + tensor_scale] = make_quantizer(scheme, x)
    return found


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_of_encode_is_forward(dtype):
    for source in (with_outliers(), with_zero_blocks(), magnitude_ladder()[:, :256], ties(E2M1, 32, "e8m0")):
        x = source.to(dtype)
        for name, quantizer in all_quantizers(x).items():
            codes, ranges = quantizer.encode(x)
            assert codes.dtype == torch.int32 and codes.shape == x.shape
            assert_same(quantizer.decode(codes, ranges).to(dtype), quantizer(x))


def test_e2m1_codes_are_the_ocp_table():
    # (value, sign, exponent field, mantissa) from the OCP E2M1 table
    table = [(0.0, 0, 0, 0), (0.5, 0, 0, 1), (1.0, 0, 1, 0), (1.5, 0, 1, 1), (2.0, 0, 2, 0), (3.0, 0, 2, 1),
             (4.0, 0, 3, 0), (6.0, 0, 3, 1), (-0.0, 1, 0, 0), (-0.5, 1, 0, 1), (-1.0, 1, 1, 0), (-1.5, 1, 1, 1),
             (-2.0, 1, 2, 0), (-3.0, 1, 2, 1), (-4.0, 1, 3, 0), (-6.0, 1, 3, 1)]
    values = torch.tensor([value for value, *_ in table] * 2) * 2.0 ** -5  # block max 6 * 2^-5: scale 2^-5
    expected = torch.tensor([sign << 3 | field << 1 | mantissa for _, sign, field, mantissa in table] * 2)
    quantizer = BlockQuantizer.from_tensor(values[None], E2M1, 32, "e8m0")
    codes, ranges = quantizer.encode(values[None])
    assert ranges["scale"].item() == 2.0 ** -5
    assert codes[0].tolist() == expected.tolist()


def test_nvfp4_block_scales_are_e4m3_values(smollm2_linears):
    for x in [with_outliers(), nvfp4_scale_ladder(), *(w[:SMOLLM2_ROWS] for w in smollm2_linears.values())]:
        scale = BlockQuantizer.from_tensor(x, E2M1, 16, "e4m3").scale
        assert_same(scale.to(torch.float8_e4m3fn).float(), scale)
        assert scale.min() > 0 and scale.max() <= 448  # E4M3 subnormals included; a zero became 0.125
    ladder = BlockQuantizer.from_tensor(nvfp4_scale_ladder(), E2M1, 16, "e4m3").scale
    assert (ladder < 2.0 ** -6).sum() > 10 and (ladder == 448).any()  # the ladder reaches the E4M3 subnormals


@pytest.mark.parametrize("fmt, block_size, encoding", [(E2M1, 32, "e8m0"), (E2M3, 32, "e8m0"),
                                                       (E4M3, 32, "e8m0"), (E2M1, 16, "e4m3")])
def test_ties_input_holds_midpoints(fmt, block_size, encoding):
    """The "ties" input does what it says: divided by its block steps, over a third of it lies exactly halfway
    between two element values."""
    x = ties(fmt, block_size, encoding)
    quantizer = BlockQuantizer.from_tensor(x, fmt, block_size, encoding)
    blocks = blocks_of(x, block_size)
    scaled = (blocks / quantizer.step(*quantizer.scales(blocks))).abs()
    assert torch.isin(scaled, midpoints(fmt).float()).float().mean() > 1 / 3


def test_e8m0_block_scales_are_powers_of_two():
    scale = BlockQuantizer.from_tensor(magnitude_ladder(), E2M1, 32, "e8m0").scale
    assert (torch.frexp(scale).mantissa == 0.5).all()
    assert scale.min() == 2.0 ** -127  # the subnormal blocks: code 0


# ---- 5. saved quantizers ----

def test_saved_quantizers_reload_identical():
    x = with_outliers()
    later = with_outliers(seed=9) * 3  # other inputs, beyond the calibrated range
    for name, quantizer in all_quantizers(x).items():
        spec, tensors = quantizer_to_state(quantizer)
        reloaded = quantizer_from_state(json.loads(json.dumps(spec)), {k: v.clone() for k, v in tensors.items()})
        assert reloaded.spec() == quantizer.spec(), name
        for y in (x, later):
            assert_same(reloaded(y), quantizer(y))
        if quantizer.spec().dynamic:  # a dynamic quantizer keeps no block scales
            assert "scale" not in tensors


# ---- 6. refusals ----

def test_block_size_must_divide_the_last_dimension():
    with pytest.raises(ValueError, match="block size 32 does not divide the last dimension 48"):
        BlockQuantizer.from_tensor(torch.randn(4, 48), E2M1, 32, "e8m0")
    with pytest.raises(ValueError, match="block size 16 does not divide the last dimension 40"):
        make_quantizer(Scheme(E2M1, "group", 16, "e4m3", dynamic=True, tensor_scale="dynamic"))(torch.randn(2, 40))


@pytest.mark.parametrize("encoding", ["e8m0", "e4m3"])
@pytest.mark.parametrize("granularity", ["tensor", "row", "channel", "token"])
def test_block_scales_need_groups(encoding, granularity):
    with pytest.raises(ValueError, match=f"{encoding} scales belong to blocks"):
        Scheme(E2M1, granularity, 0, encoding)


def test_unknown_rule_encoding_and_misplaced_options_refused():
    with pytest.raises(ValueError, match="unknown E8M0 scale rule 'nearest'"):
        mx_scale_codes(torch.ones(2), E2M1, "nearest")
    with pytest.raises(ValueError, match="unknown E8M0 scale rule 'nearest'"):
        BlockQuantizer(E2M1, 32, "e8m0", dynamic=True, rule="nearest")
    with pytest.raises(ValueError, match="unknown E8M0 scale rule 'nearest'"):
        make_quantizer(Scheme(E2M1, "group", 32, "e8m0", rule="nearest"), torch.randn(2, 32))
    with pytest.raises(ValueError, match="unknown block scale encoding 'e5m0'"):
        BlockQuantizer(E2M1, 32, "e5m0", dynamic=True)
    with pytest.raises(ValueError, match="rule applies to e8m0 block scales only"):
        Scheme(E2M1, "group", 16, "e4m3", rule="floor")
    with pytest.raises(ValueError, match="tensor_scale applies to e4m3 block scales only"):
        Scheme(E2M1, "group", 32, "e8m0", tensor_scale="static")
    with pytest.raises(ValueError, match="does not apply to INT4"):
        Scheme(IntElement(4), "group", 32, "e8m0")
    with pytest.raises(ValueError, match="four over six"):
        BlockQuantizer.from_tensor(torch.randn(2, 32), E2M1, 32, "e8m0", divisor=4.0)
    with pytest.raises(ValueError, match="needs its block scales"):
        BlockQuantizer(E2M1, 32, "e8m0")
