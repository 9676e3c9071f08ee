import pytest
import torch

from quant_layers import FPFormat, LinearSearch, QuantLinear, SearchSettings, fp_quantize
from quant_layers.search import BIAS_FIRST, WEIGHT_FIRST, ActState, WeightState, grid_argmin


def layer_data(seed=0, tokens=600, out=48, inp=32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    x = torch.randn(tokens, inp, generator=g)
    x[:, 3] *= 40  # an outlier channel, as LLM activations have
    x[:, 7] *= 0.01
    return w, x


def direct_loss(w, x, q_eff, xq):
    return ((x @ w.T - xq @ q_eff.T) ** 2).sum(0)


def test_gamma_grids():
    paper = SearchSettings(gamma_low=0.01, gamma_high=1.2, n_candidates=100).gammas()
    reference = SearchSettings(gamma_low=0.01, gamma_high=1.2, n_candidates=100, grid="reference").gammas()
    assert reference.numel() == 100 and not torch.isclose(reference, torch.tensor(1.0)).any()
    assert reference.max().item() == pytest.approx(0.01 + 99 * 1.19 / 100)
    assert paper.numel() == 102 and (paper == 1.0).any() and paper.max().item() == pytest.approx(1.2)


@pytest.mark.parametrize("tokens", [600, 20])  # Gram form (tokens > in) and direct form (tokens < in)
@pytest.mark.parametrize("per_channel, folded", [(False, False), (True, False), (True, True)])
def test_row_losses_equal_direct_computation(per_channel, folded, tokens):
    w, x = layer_data(tokens=tokens)
    search = LinearSearch(w, x, SearchSettings(n_candidates=8), per_channel=per_channel, folded=folded)
    act = ActState(FPFormat(2, 1), 0.9)
    weight = WeightState(FPFormat(2, 1), torch.full((w.shape[0],), 0.95))
    q_eff = search.effective_weight(weight.fmt, weight.gamma, search.shift_of(act))
    expected = direct_loss(w, x, q_eff, search.quantize_inputs(x, act))
    torch.testing.assert_close(search.row_losses(q_eff, act), expected, rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize("method", ["baseline", "simulated", "folded"])
def test_search_is_never_worse_than_minmax_and_beats_it_here(method):
    w, x = layer_data(seed=3)
    search = LinearSearch(w, x, SearchSettings(n_candidates=20), per_channel=method != "baseline",
                          folded=method == "folded")
    order = WEIGHT_FIRST if method == "baseline" else BIAS_FIRST
    _, _, report = search.run(FPFormat(2, 1), FPFormat(2, 1), order)
    assert report["searched"] < 0.9 * report["minmax"]


def test_preshifted_beats_per_tensor_with_outlier_channels():
    w, x = layer_data(seed=4)
    losses = {}
    for per_channel in (False, True):
        search = LinearSearch(w, x, SearchSettings(n_candidates=20), per_channel=per_channel)
        losses[per_channel] = search.run(FPFormat(2, 1), FPFormat(2, 1))[2]["searched"]
    assert losses[True] < losses[False]


def test_folded_and_simulated_activation_sides_are_identical():
    w, x = layer_data(seed=5)
    act = ActState(FPFormat(2, 1), 0.8)
    simulated = LinearSearch(w, x, SearchSettings(n_candidates=4), per_channel=True, folded=False)
    folded = LinearSearch(w, x, SearchSettings(n_candidates=4), per_channel=True, folded=True)
    sim_quantizer, none = simulated.act_quantizer(act)
    fold_quantizer, shift = folded.act_quantizer(act)
    assert none is None and shift.abs().sum() > 0 and fold_quantizer.bias.dim() == 0
    torch.testing.assert_close(fold_quantizer(x * torch.exp2(shift)) * torch.exp2(-shift), sim_quantizer(x),
                               rtol=1e-6, atol=0)


def test_folded_quant_linear_equals_its_unfolded_computation():
    w, x = layer_data(seed=6)
    search = LinearSearch(w, x, SearchSettings(n_candidates=8), per_channel=True, folded=True)
    weight, act, report = search.run(FPFormat(2, 1), FPFormat(2, 1))
    layer = QuantLinear(torch.nn.Linear(w.shape[1], w.shape[0], bias=False))
    layer.weight.data = w.clone()
    layer.weight_quantizer = search.weight_quantizer(weight, act)
    layer.act_quantizer, layer.input_shift = search.act_quantizer(act)
    layer.freeze()
    # unfolded: simulated per-channel activation biases times the effective (shifted-back) weight
    q_eff = search.effective_weight(weight.fmt, weight.gamma, search.shift_of(act))
    expected = search.quantize_inputs(x, act) @ q_eff.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert ((layer(x) - x @ w.T) ** 2).sum().item() == pytest.approx(report["searched"], rel=1e-3)


def test_weight_only_search_leaves_activations_alone():
    w, x = layer_data(seed=7)
    search = LinearSearch(w, x, SearchSettings(n_candidates=8), per_channel=False)
    weight, act, report = search.run(FPFormat(2, 1), None, WEIGHT_FIRST)
    assert act.fmt is None and report["searched"] < report["minmax"]


def test_coarse_strategy_finds_the_minimum_of_a_unimodal_loss_with_few_evaluations():
    gammas = SearchSettings(n_candidates=100).gammas()
    target = torch.rand(40, generator=torch.Generator().manual_seed(0)) * 1.3
    evaluated = []

    def loss_fn(g, rows):
        evaluated.append(g.shape[0])
        return (g - target[rows]).abs().sqrt()  # unimodal, not smooth at the minimum
    full, _ = grid_argmin(loss_fn, gammas, 40, "full", 1, 1 << 20)
    evaluated.clear()
    coarse, _ = grid_argmin(loss_fn, gammas, 40, "coarse", 1, 1 << 20)
    assert torch.equal(full, coarse)
    assert sum(evaluated) <= 24 < gammas.numel() / 4
    # a warm start within the coarse stride of the answer refines to it without the coarse pass
    evaluated.clear()
    start = (full + torch.randint(-9, 10, (40,), generator=torch.Generator().manual_seed(1))).clamp(0, 101)
    warm, _ = grid_argmin(loss_fn, gammas, 40, "coarse", 1, 1 << 20, start=start)
    assert torch.equal(full, warm)
    assert sum(evaluated) <= 11


def test_quantize_helpers_handle_dead_channels():
    w, x = layer_data(seed=8)
    x[:, 11] = 0
    search = LinearSearch(w, x, SearchSettings(n_candidates=6), per_channel=True, folded=True)
    weight, act, _ = search.run(FPFormat(2, 1), FPFormat(2, 1))
    quantizer, shift = search.act_quantizer(act)
    assert torch.isfinite(quantizer(x * torch.exp2(shift))).all()
    assert torch.isfinite(fp_quantize(w, weight.fmt, search.weight_bias(weight, act))).all()
