"""The named formats (NVFP4, MX, INT4 groups) under the rtn and gptq methods: every format calibrates, saves and
reloads bit-identically, fused layers share their tensor scales, the clip search and GPTQ lower every layer's
output error below RTN, what cannot run is refused in one line, and on the real SmolLM2 our NVFP4 RTN model is
the one compressed-tensors' own functions give."""
from dataclasses import replace

import pytest
import torch
from conftest import tiny_llama

import main
from configs import BlockSettings, QuantConfig, block_parameter_settings, load_config
from quant_layers.block_search import search_input_tensor_scale
from quant_layers.blocks import BlockQuantizer, nvfp4_tensor_scale
from quant_layers.rotations import BlockHadamard
from quant_layers.schemes import PRESETS, make_quantizer
from utils import data, evaluation, models
from utils.block_formats import prepare_formats
from utils.calibrate import quantize
from utils.errors import ParamFileError, UsageError
from utils.methods import ParamFile

TINY_FORMATS = [name for name in PRESETS if not name.startswith("W4")]  # the tiny model is 64 wide: no 128-groups


def config_for(format_name, method="rtn", **settings):
    base = QuantConfig(name="test_format", method=method, block=BlockSettings(format_name, **settings))
    return replace(base, search=replace(base.search, n_candidates=12, strategy="coarse"))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def calibrate_and_reload(config, calib_ids, path, model=None):
    model = model or tiny_llama()
    quantize(model, config, calib_ids, progress=False, files=ParamFile(path))
    fresh = tiny_llama()
    report = quantize(fresh, config, None, progress=False, files=ParamFile(path, "reload"))
    assert report.loaded
    return model, fresh


@pytest.mark.parametrize("format_name", TINY_FORMATS)
def test_every_format_calibrates_and_reloads_bit_identically(format_name, calib_ids, tmp_path):
    config = replace(config_for(format_name), quantize_lm_head=True, quantize_embedding=True)
    model, fresh = calibrate_and_reload(config, calib_ids, tmp_path / "p.safetensors")
    out = logits(model, calib_ids)
    assert torch.isfinite(out).all() and not torch.equal(out, logits(tiny_llama(), calib_ids))
    assert torch.equal(logits(fresh, calib_ids), out)
    _, block_size, _, inputs = PRESETS[format_name]
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.weight_quantizer.spec() == config.scheme("weight")
    assert (q_proj.act_quantizer is not None) == inputs
    assert model.lm_head.weight_quantizer is not None and model.model.embed_tokens.weight_quantizer is not None
    assert q_proj.weight_quantizer.block_size == block_size


@pytest.mark.parametrize("method,settings", [("gptq", {}), ("gptq", {"act_order": True}), ("rtn", {"search": True}),
                                             ("rtn", {"four_over_six": True}),
                                             ("gptq", {"search": True, "four_over_six": True}),
                                             ("rtn", {"hadamard": True}), ("gptq", {"hadamard": True}),
                                             ("gptq", {"four_over_six_inputs": True}),
                                             ("rtn", {"search": True, "four_over_six_inputs": True})])
def test_calibrated_methods_reload_bit_identically(method, settings, calib_ids, tmp_path):
    """GPTQ's weights are not recomputable from W and the scales: the file keeps their codes."""
    config = config_for("NVFP4", method, **settings)
    model, fresh = calibrate_and_reload(config, calib_ids, tmp_path / "p.safetensors")
    assert torch.equal(logits(fresh, calib_ids), logits(model, calib_ids))
    q_proj = fresh.model.layers[1].self_attn.q_proj
    assert q_proj.weight_on_grid == (method == "gptq")
    assert torch.equal(q_proj.weight_quantizer(q_proj.quantized_weight), q_proj.quantized_weight)
    assert q_proj.act_quantizer.four_over_six == settings.get("four_over_six_inputs", False)


def test_input_four_over_six_is_each_input_blocks_choice_with_room_for_it_in_the_tensor_scale(calib_ids):
    """Calibrated as plain NVFP4 but for the inputs: the same weights (RTN does not read the inputs), input
    tensor scales aimed at 256 instead of 448, and each input block quantized by the lower-error mapping."""
    plain, adaptive = tiny_llama(), tiny_llama()
    quantize(plain, config_for("NVFP4"), calib_ids, progress=False)
    quantize(adaptive, config_for("NVFP4", four_over_six_inputs=True), calib_ids, progress=False)
    for name, module in adaptive.named_modules():
        if hasattr(module, "act_quantizer") and module.act_quantizer is not None:
            reference = plain.get_submodule(name)
            assert torch.equal(module.quantized_weight, reference.quantized_weight)
            ratio = module.act_quantizer.tensor_scale / reference.act_quantizer.tensor_scale
            assert torch.isclose(ratio, torch.tensor(256 / 448)), name
    assert not torch.equal(logits(adaptive, calib_ids), logits(plain, calib_ids))


def test_a_parameter_file_from_before_a_setting_existed_reads_as_its_default():
    saved = BlockSettings("NVFP4").parameter_settings()
    del saved["four_over_six_inputs"]
    assert block_parameter_settings(saved) == BlockSettings("NVFP4").parameter_settings()
    assert block_parameter_settings(saved) != BlockSettings("NVFP4", four_over_six_inputs=True).parameter_settings()


def test_the_hadamard_gptq_config_rotates_then_runs_gptq_and_reloads_bit_identically(calib_ids, tmp_path):
    config = load_config("MXFP4_Hadamard_GPTQ_config")
    assert config == replace(load_config("MXFP4_GPTQ_config"), name=config.name,
                             block=replace(load_config("MXFP4_GPTQ_config").block, hadamard=True))
    model, fresh = calibrate_and_reload(config, calib_ids, tmp_path / "p.safetensors")
    assert torch.equal(logits(fresh, calib_ids), logits(model, calib_ids))
    q_proj = fresh.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.input_transform, BlockHadamard) and q_proj.weight_on_grid


@pytest.mark.parametrize("format_name", ["NVFP4", "MXFP4"])
def test_search_and_gptq_lower_every_layers_output_error(format_name, calib_ids):
    for method, settings in (("rtn", {"search": True}), ("gptq", {"layer_errors": True}), ("gptq", {"search": True})):
        report = quantize(tiny_llama(), config_for(format_name, method, **settings), calib_ids, progress=False)
        errors = {path: (entry["output_error"], entry["rtn_output_error"]) for path, entry in report.layers.items()}
        assert len(errors) == 2 * 7 + 1  # and lm_head
        for path, (error, rtn) in errors.items():
            assert error < rtn, (method, settings, path)


@pytest.mark.parametrize("method,settings", [("gptq", {}), ("gptq", {"four_over_six": True}),
                                             ("rtn", {"four_over_six": True})])
def test_layer_errors_change_the_report_not_the_parameters(method, settings, calib_ids, tmp_path):
    plain = config_for("NVFP4", method, **settings)
    reported = replace(plain, block=replace(plain.block, layer_errors=True))
    path = tmp_path / "p.safetensors"
    model, with_errors = tiny_llama(), tiny_llama()
    quiet = quantize(model, plain, calib_ids, progress=False, files=ParamFile(path))
    loud = quantize(with_errors, reported, calib_ids, progress=False)
    assert torch.equal(logits(with_errors, calib_ids), logits(model, calib_ids))
    q_proj = "model.layers.0.self_attn.q_proj"
    assert "output_error" in loud.layers[q_proj] and "rtn_output_error" in loud.layers[q_proj]
    assert "output_error" not in quiet.layers[q_proj]  # only X'X was computed
    assert ("gptq_loss" in quiet.layers[q_proj]) == (method == "gptq")
    fresh = tiny_llama()  # a file of the same parameters reloads whatever the report asked for
    assert quantize(fresh, reported, None, progress=False, files=ParamFile(path, "reload")).loaded
    assert torch.equal(logits(fresh, calib_ids), logits(model, calib_ids))


def test_the_hadamard_rotation_leaves_the_full_precision_model_unchanged(calib_ids):
    model = tiny_llama()
    prepare_formats(model, config_for("MXFP4", hadamard=True))
    prepare_formats(model, config_for("MXFP4", hadamard=True))  # idempotent: rotated once
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.input_transform, BlockHadamard) and q_proj.input_transform.size == 32
    reference = logits(tiny_llama(), calib_ids)
    assert torch.allclose(logits(model, calib_ids), reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())
    assert not torch.allclose(q_proj.weight, tiny_llama().model.layers[0].self_attn.q_proj.weight)


def test_fused_layers_share_their_tensor_scales(calib_ids):
    model = tiny_llama()
    quantize(model, config_for("NVFP4"), calib_ids, progress=False)
    for block in model.model.layers:
        attention, mlp = block.self_attn, block.mlp
        for group in ((attention.q_proj, attention.k_proj, attention.v_proj), (mlp.gate_proj, mlp.up_proj)):
            weights = {m.weight_quantizer.tensor_scale.item() for m in group}
            inputs = {m.act_quantizer.tensor_scale.item() for m in group}
            assert len(weights) == 1 and len(inputs) == 1
            own = [BlockQuantizer.from_tensor(m.weight, m.weight_quantizer.fmt, 16, "e4m3").tensor_scale for m in group]
            assert weights.pop() == min(own).item() and len(set(s.item() for s in own)) > 1


def test_what_cannot_run_is_refused_in_one_line(calib_ids, tmp_path):
    with pytest.raises(UsageError, match="W4A16_G128 blocks of 128 do not divide the 64 inputs of model"):
        quantize(tiny_llama(), config_for("W4A16_G128"), calib_ids, progress=False)
    with pytest.raises(UsageError, match="four over six"):
        config_for("MXFP4", four_over_six=True)
    for weight_only_or_mx in ("NVFP4A16", "MXFP4"):
        with pytest.raises(UsageError, match="--four_over_six_inputs chooses between NVFP4 input block scales"):
            config_for(weight_only_or_mx, four_over_six_inputs=True)
    path = tmp_path / "p.safetensors"
    quantize(tiny_llama(), config_for("NVFP4"), calib_ids, progress=False, files=ParamFile(path))
    with pytest.raises(ParamFileError, match="block"):  # another format under the same config name
        quantize(tiny_llama(), config_for("MXFP4"), None, progress=False, files=ParamFile(path, "reload"))


def test_the_input_tensor_scale_search_beats_rtn_where_an_outlier_dwarfs_the_other_blocks():
    """gamma = 1 is RTN's input quantizer bit for bit; with one block 10^4 above the rest, RTN's tensor scale
    leaves the other blocks' E4M3 scales subnormal, and the search finds a clipped tensor scale that errs less."""
    torch.manual_seed(0)
    x, w = torch.randn(256, 64), torch.randn(48, 64)
    x[3, :16] *= 1e4
    _, input_scheme = BlockSettings("NVFP4").schemes()
    rtn = make_quantizer(input_scheme, x)
    q = BlockQuantizer.from_tensor(w, input_scheme.element, 16, "e4m3")(w)

    def error(act):
        return (act(x) @ q.T - x @ w.T).square().sum()

    settings = replace(QuantConfig(name="t", method="rtn").search, n_candidates=20, act_search_tokens=None)
    only = replace(settings, gamma_high=2.0, n_candidates=1, grid="reference")  # the grid {gamma_low}
    assert torch.equal(search_input_tensor_scale(rtn, x, w, q, replace(only, gamma_low=1.0)).tensor_scale,
                       rtn.tensor_scale)
    clipped = search_input_tensor_scale(rtn, x, w, q, replace(only, gamma_low=0.5)).tensor_scale
    assert torch.equal(clipped, nvfp4_tensor_scale(x.abs().amax() * 0.5))
    searched = search_input_tensor_scale(rtn, x, w, q, settings)
    assert searched.tensor_scale > rtn.tensor_scale and error(searched) < 0.9 * error(rtn)
    x[3, :16] /= 1e4  # no outlier: the search may keep RTN's scale but never errs more than it
    plain = make_quantizer(input_scheme, x)
    assert error(search_input_tensor_scale(plain, x, w, q, settings)) <= error(plain)


def test_cli_refuses_flags_a_format_config_would_ignore():
    for flags in (["--qbits", "4", "4", "4", "2", "2", "2"], ["--search_round", "2"], ["--preshift", "folded"],
                  ["--search_intervals", "0.5", "1.2", "10"]):  # NVFP4_config does not search
        with pytest.raises(UsageError, match="has no effect"):
            main.run(main.build_parser().parse_args(["--quant_config", "NVFP4_config", *flags]))
    for flags in (["--format", "MXFP4"], ["--four_over_six"], ["--four_over_six_inputs"], ["--act_order"]):  # not LLM-FP4
        with pytest.raises(UsageError, match="has no effect"):
            main.run(main.build_parser().parse_args(["--quant_config", "FPQ_config_llama", *flags]))
    inputs46 = main.build_parser().parse_args(["--quant_config", "NVFP4_GPTQ_config", "--four_over_six_inputs"])
    assert main.make_config(inputs46).block == replace(load_config("NVFP4_GPTQ_config").block, four_over_six_inputs=True)
    rounds = ["--search_round", "2", "--act_search_tokens", "64"]  # read where NVFP4's input tensor scale is searched
    assert main.make_config(main.build_parser().parse_args(["--quant_config", "NVFP4_search_config", *rounds])).search.rounds == 2
    for flags in (["--quant_config", "MXFP4_search_config"], ["--quant_config", "NVFP4_search_config", "--format", "MXFP4"],
                  ["--quant_config", "NVFP4_search_config", "--input_tensor_scale", "dynamic"]):
        with pytest.raises(UsageError, match="has no effect"):
            main.run(main.build_parser().parse_args([*flags, *rounds]))
    args = main.build_parser().parse_args(["--quant_config", "NVFP4_GPTQ_config", "--format", "MXFP4",
                                           "--act_order", "--ignore", "none", "--layer_errors"])
    config = main.make_config(args)
    assert (config.block.format, config.block.act_order, config.quantize_lm_head) == ("MXFP4", True, True)
    assert config.block.layer_errors and not load_config("NVFP4_GPTQ_config").block.layer_errors


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = models.load_model("smollm2-135m-offline", "float32", "cpu", False)
    calib = data.calibration_samples(tokenizer, "enwiki", 4, 128, 0)
    return model, calib, data.evaluation_tokens(tokenizer, "enwiki-heldout")


def compressed_tensors_nvfp4(model, calib):
    """SmolLM2 fake-quantized to NVFP4 W4A4 with compressed-tensors' functions alone: weight global scales shared
    by q/k/v and gate/up (their minimum), static input global scales from the calibration inputs' min and max as
    llm-compressor observes them (under eager attention), dynamic per-token input blocks. Returns the hook handles
    (remove them to get the FP model back), the original weights and the input global scales."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
    from compressed_tensors.quantization.utils.helpers import (calculate_qparams, compute_dynamic_scales_and_zp,
                                                               generate_gparam)
    scheme = preset_name_to_scheme("NVFP4", ["Linear"])
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in name}
    ranges = {}

    def observe(name):
        def hook(_module, args):
            x = args[0].detach()
            low, high = ranges.get(name, (x.amin(), x.amax()))
            ranges[name] = (torch.minimum(low, x.amin()), torch.maximum(high, x.amax()))
        return hook
    handles = [m.register_forward_pre_hook(observe(name)) for name, m in linears.items()]
    own_attention, model.config._attn_implementation = model.config._attn_implementation, "eager"
    try:
        with torch.no_grad():  # one window at a time, as the toolkit calibrates: the same float arithmetic
            for window in calib:
                model(window[None])
    finally:
        model.config._attn_implementation = own_attention
        for handle in handles:
            handle.remove()

    def fused(name):
        for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            if name.split(".")[-1] in group:
                return [name.rsplit(".", 1)[0] + "." + member for member in group]
        return [name]
    originals, handles, input_scales = {name: m.weight.data.clone() for name, m in linears.items()}, [], {}
    for name, module in linears.items():
        weight = originals[name]
        global_scale = min(generate_gparam(originals[n].amin(), originals[n].amax()) for n in fused(name))
        blocks = weight.reshape(weight.shape[0], -1, 16)
        scale, zero = calculate_qparams(blocks.amin(-1), blocks.amax(-1), scheme.weights, global_scale=global_scale)
        module.weight.data = fake_quantize(weight, scale, zero, scheme.weights, global_scale=global_scale)
        input_scale = input_scales[name] = generate_gparam(*ranges[name])

        def quantize_input(_module, args, input_scale=input_scale):
            x = args[0]
            scale, zero = compute_dynamic_scales_and_zp(x, scheme.input_activations, None, global_scale=input_scale)
            return (fake_quantize(x, scale, zero, scheme.input_activations, global_scale=input_scale),)
        handles.append(module.register_forward_pre_hook(quantize_input))
    return handles, originals, input_scales


def test_nvfp4_rtn_on_smollm2_is_what_compressed_tensors_computes(smollm2):
    """Weights and input tensor scales bit for bit (the scales need llm-compressor's eager attention while
    calibrating: under sdpa most of them differ in their last bits), so the perplexity too."""
    model, calib, tokens = smollm2
    handles, originals, input_scales = compressed_tensors_nvfp4(model, calib)
    reference = evaluation.perplexity(model, tokens, 256, 4, progress=False)
    reference_weights = {name: model.get_submodule(name).weight.data.clone() for name in originals}
    for handle in handles:
        handle.remove()
    for name, weight in originals.items():
        model.get_submodule(name).weight.data = weight
    ours = load_config("NVFP4_config")
    quantize(model, ours, calib, progress=False)
    assert model.config._attn_implementation == "sdpa"  # the model's own again after calibrating
    for name, weight in reference_weights.items():
        assert torch.equal(model.get_submodule(name).quantized_weight, weight), name
        assert torch.equal(model.get_submodule(name).act_quantizer.tensor_scale, input_scales[name].reshape(())), name
    assert evaluation.perplexity(model, tokens, 256, 4, progress=False) == pytest.approx(reference, rel=1e-6)
