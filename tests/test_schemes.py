"""Schemes as data, the quantizers they build, and integer codes (encode / decode)."""
import json
import pytest
import torch

from quant_layers import FPFormat, FPQuantizer, IntElement, IntQuantizer, Scheme, make_quantizer
from quant_layers.gptq import rtn_quantize
from quant_layers.quantizers import quantizer_from_state, quantizer_to_state

E2M1 = FPFormat(2, 1)


def weights(rows=16, cols=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.exp(torch.randn(rows, 1, generator=g))
    w[0] = 0.0  # an all-zero row
    w[1, 3] = 40.0  # an outlier
    return w


def test_scheme_validation_and_json_round_trip():
    with pytest.raises(ValueError, match="group size"):
        Scheme(E2M1, "row", group_size=32)
    with pytest.raises(ValueError, match="group size"):
        Scheme(E2M1, "group")
    with pytest.raises(ValueError, match="does not apply"):
        Scheme(IntElement(4), "row", scale="exponent_bias")
    with pytest.raises(ValueError, match="dynamic"):
        Scheme(E2M1, "row", dynamic=True)
    with pytest.raises(ValueError, match="unknown scale"):
        Scheme(E2M1, "row", scale="e9m9")
    for size, scale, dynamic in ((16, "e4m3", False), (32, "e8m0", True)):  # static weights, MX inputs
        with pytest.raises(ValueError, match="four over six as a scheme applies to dynamic E4M3"):
            Scheme(E2M1, "group", size, scale, dynamic, four_over_six=True)
    assert Scheme(E2M1, "token").dynamic and Scheme(IntElement(4)).scale == "float"
    for scheme in (Scheme(E2M1, "row"), Scheme(FPFormat(3, 0, "reference"), "channel"),
                   Scheme(IntElement(4, False), "group", 32, dynamic=True), Scheme(IntElement(8, True, True), "token"),
                   Scheme(E2M1, "group", 16, "e4m3", dynamic=True, four_over_six=True)):
        assert Scheme.from_dict(scheme.to_dict()) == scheme


@pytest.mark.parametrize("granularity", ["tensor", "row", "channel", "token"])
def test_make_quantizer_equals_the_minmax_constructors(granularity):
    w = weights()
    fp = make_quantizer(Scheme(E2M1, granularity), w)
    assert torch.equal(fp(w), FPQuantizer.minmax(w, E2M1, granularity)(w))
    for symmetric in (True, False):
        q = make_quantizer(Scheme(IntElement(4, symmetric), granularity), w)
        assert torch.equal(q(w), IntQuantizer.minmax(w, 4, granularity, symmetric)(w))


@pytest.mark.parametrize("element", [E2M1, IntElement(4), IntElement(4, False), IntElement(4, True, True)])
def test_group_quantizer_equals_one_row_quantizer_per_column_group(element):
    w = weights()
    quantizer = make_quantizer(Scheme(element, "group", 16), w)
    per_group = torch.cat([make_quantizer(Scheme(element, "row"), w[:, i:i + 16])(w[:, i:i + 16])
                           for i in range(0, 64, 16)], dim=1)
    assert torch.equal(quantizer(w), per_group)
    # RTN with GPTQ's per-group quantizers gives the same weights
    assert torch.equal(rtn_quantize(w, lambda part: make_quantizer(Scheme(element, "row"), part), 16).weight,
                       quantizer(w))
    with pytest.raises(ValueError, match="does not divide"):
        make_quantizer(Scheme(element, "group", 24), w)


def test_dynamic_groups_take_each_token_groups_range():
    x = weights(8, 64, seed=1)
    quantizer = make_quantizer(Scheme(IntElement(4), "group", 32, dynamic=True))
    halves = [IntQuantizer.minmax(x[:, i:i + 32], 4, "token")(x[:, i:i + 32]) for i in (0, 32)]
    assert torch.equal(quantizer(x), torch.cat(halves, dim=1))


@pytest.mark.parametrize("scheme", [Scheme(E2M1, "tensor"), Scheme(E2M1, "row"), Scheme(FPFormat(4, 3), "channel"),
                                    Scheme(E2M1, "token"), Scheme(E2M1, "group", 16),
                                    Scheme(IntElement(4, False), "row"), Scheme(IntElement(8), "group", 32, dynamic=True)])
def test_quantizers_say_their_scheme_and_survive_their_state(scheme):
    w = weights()
    quantizer = make_quantizer(scheme, w)
    assert quantizer.spec() == scheme
    spec, tensors = quantizer_to_state(quantizer)
    restored = quantizer_from_state(spec, tensors)
    assert restored.spec() == scheme and torch.equal(restored(w), quantizer(w))


def test_e2m1_codes_are_the_ocp_table():
    # at exponent bias 1, E2M1's values are 0, 0.5, 1, 1.5, 2, 3, 4, 6: codes 0..7, sign in bit 3
    values = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.5, -6.0, 7.0, 0.7, 2.5])
    quantizer = FPQuantizer(E2M1, torch.tensor(1.0))
    codes, ranges = quantizer.encode(values)
    assert codes.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 9, 15, 7, 1, 4]  # 7 clips to 6; 2.5 ties to even (2)
    assert torch.equal(quantizer.decode(codes, ranges), quantizer(values))


@pytest.mark.parametrize("fmt", [E2M1, FPFormat(1, 2), FPFormat(3, 0), FPFormat(4, 3), FPFormat(5, 2)])
def test_fp_codes_decode_to_the_fake_quantized_values(fmt):
    w = weights(64, 128, seed=2)
    for scheme in (Scheme(fmt, "row"), Scheme(fmt, "token"), Scheme(fmt, "group", 32)):
        quantizer = make_quantizer(scheme, w)
        codes, ranges = quantizer.encode(w)
        assert codes.dtype == torch.int32 and 0 <= codes.min() and codes.max() < 2 ** fmt.bits
        decoded, expected = quantizer.decode(codes, ranges), quantizer(w)
        # equal, except a value rounded up across a binade edge may differ in the last bit (see fp_decode)
        assert torch.allclose(decoded, expected, rtol=2 ** -22, atol=0)
        assert (decoded == expected).float().mean() > 0.99


def test_int_codes_decode_bit_for_bit():
    w = weights(64, 128, seed=3)
    for scheme in (Scheme(IntElement(4), "row"), Scheme(IntElement(4, False), "group", 32),
                   Scheme(IntElement(4, True, True), "tensor"), Scheme(IntElement(8, False), "token")):
        quantizer = make_quantizer(scheme, w)
        codes, ranges = quantizer.encode(w)
        element = scheme.element
        low = 0 if not element.symmetric else -(2 ** (element.bits - 1) - 1) - element.full_range
        assert low <= codes.min() and codes.max() <= (2 ** element.bits - 1 if low == 0 else 2 ** (element.bits - 1) - 1)
        assert torch.equal(quantizer.decode(codes, ranges), quantizer(w))


def test_the_reference_numerics_top_value_has_no_code():
    quantizer = FPQuantizer(FPFormat(2, 1, "reference"), torch.tensor(1.0))
    assert quantizer(torch.tensor([7.9])).item() == 8.0  # the reference's clip value, outside E2M1
    with pytest.raises(ValueError, match="no code"):
        quantizer.encode(torch.tensor([7.9]))


@pytest.mark.parametrize("element", [IntElement(4, True, True), IntElement(4, False), E2M1])
def test_gptq_ranges_survive_as_one_group_quantizer(element):
    from quant_layers import HessianAccumulator, gptq_quantize
    w = weights(16, 64, seed=4)
    accumulator = HessianAccumulator(64)
    accumulator.add(torch.randn(256, 64, generator=torch.Generator().manual_seed(5)) * torch.linspace(0.1, 3, 64))
    make = lambda part: make_quantizer(Scheme(element, "row"), part)  # noqa: E731
    for result in (gptq_quantize(w, accumulator.hessian, make, groupsize=16),
                   gptq_quantize(w, accumulator.hessian, make, groupsize=16, act_order=True, static_groups=True),
                   rtn_quantize(w, make, groupsize=16)):
        quantizer = result.weight_quantizer()
        assert quantizer.spec() == Scheme(element, "group", 16)
        codes, ranges = quantizer.encode(result.weight)  # GPTQ's values are on the merged quantizer's grid
        assert torch.allclose(quantizer.decode(codes, ranges), result.weight, rtol=2 ** -22, atol=0)
        for index, group_quantizer in enumerate(result.quantizers):  # each group keeps its own range
            columns = slice(16 * index, 16 * index + 16)
            assert torch.equal(quantizer(w)[:, columns], group_quantizer(w[:, columns]))
    scattered = gptq_quantize(w, accumulator.hessian, make, groupsize=16, act_order=True)
    quantizer = scattered.weight_quantizer()  # act-order's groups are runs of the processing order
    assert quantizer.spec() == Scheme(element, "group", 16)
    codes, ranges = quantizer.encode(scattered.weight)
    assert torch.allclose(quantizer.decode(codes, ranges), scattered.weight, rtol=2 ** -22, atol=0)
    assert torch.allclose(quantizer(scattered.weight), scattered.weight, rtol=2 ** -22, atol=0)
    for index, group_quantizer in enumerate(scattered.quantizers):  # group k: the columns GPTQ took k-th
        columns = torch.nonzero(scattered.group_index == index).flatten()
        assert len(columns) == 16 and not torch.equal(columns, torch.arange(16 * index, 16 * index + 16))
        assert torch.equal(quantizer(w)[:, columns], group_quantizer(w[:, columns]))
    spec, tensors = quantizer_to_state(quantizer)  # and it is saved and read back as it is
    assert torch.equal(quantizer_from_state(json.loads(json.dumps(spec)), tensors)(w), quantizer(w))
    assert gptq_quantize(w, accumulator.hessian, make).weight_quantizer().spec() == Scheme(element, "row")


def test_named_configs_as_schemes():
    """--qbits becomes formats in one place (QuantConfig.scheme): element, granularity of each operand."""
    from configs import load_config
    fpq = load_config("FPQ_config_llama").with_qbits([4, 8, 6, 2, 4, 3])
    assert fpq.scheme("weight") == Scheme(E2M1, "row")
    assert fpq.scheme("input") == Scheme(FPFormat(4, 3), "tensor")
    assert fpq.scheme("embedding") == Scheme(FPFormat(3, 2), "tensor")
    assert load_config("FPQ_simulated_config_llama").with_qbits([4, 4, 16, 2, 2, 2]).scheme("embedding") is None
    integer = load_config("MinMax_INT_config_llama")
    assert integer.scheme("weight") == Scheme(IntElement(4), "row")
    assert integer.scheme("input") == Scheme(IntElement(4), "tensor")
    flat = load_config("FlatQuant_config_llama")
    assert flat.scheme("weight") == Scheme(IntElement(4, True, True), "row")
    assert flat.scheme("input") == Scheme(IntElement(4, True, True), "token")
    assert load_config("FlatQuant_FP_config_llama").scheme("input") == Scheme(E2M1, "token")


def test_configs_are_written_as_schemes():
    """A config states its operands' schemes; the bit widths --qbits replaces come from their elements, and a scheme
    its method would not calibrate is refused."""
    from dataclasses import replace
    from configs import QuantConfig, load_config
    from utils.errors import UsageError
    written = QuantConfig.from_schemes("x", "fpq", weight=Scheme(FPFormat(3, 2), "row"),
                                       inputs=Scheme(FPFormat(1, 2), "tensor"), embedding=None)
    assert (written.qbits, written.element) == ([6, 4, 16, 3, 1, 2], "fp")
    assert written == replace(QuantConfig("x", "fpq"), w_bits=6, a_bits=4, e_bits=16, w_exp=3, a_exp=1)
    assert load_config("MinMax_INT_config_llama") == QuantConfig("MinMax_INT_config_llama", "minmax", element="int",
                                                                 embedding_search=False)
    with pytest.raises(UsageError, match="input scheme .* is not what the fpq method calibrates"):
        QuantConfig.from_schemes("x", "fpq", weight=Scheme(E2M1, "row"), inputs=Scheme(E2M1, "token"), embedding=None)
    with pytest.raises(UsageError, match="weight scheme"):  # FlatQuant's INT4 is full-range symmetric
        QuantConfig.from_schemes("x", "minmax", weight=Scheme(IntElement(4, True, True), "row"),
                                 inputs=Scheme(IntElement(4), "tensor"), embedding=None)
