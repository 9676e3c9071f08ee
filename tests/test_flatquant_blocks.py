"""FlatQuant with a named block format (NVFP4, MXFP4) on a tiny random LLaMA (fast): the training quantizer is the
format's quantizer bit for bit with gradients through both roundings, folding is exact, training beats the untrained
and the identity transform, the learned per-row clip reaches the deployed block scales, fused layers share tensor
scales, matrix files reload bit-identically and files or settings of another format are refused."""
from dataclasses import replace

import pytest
import torch

from configs import BlockSettings, load_config
from conftest import tiny_llama
from quant_layers.blocks import BlockQuantizer
from quant_layers.learnable import LearnableBlockQuantizer
from utils.calibrate import quantize, set_quantized
from utils.errors import UsageError
from utils.flatquant import MatrixFileError, flat_quantize, read_matrices, matrix_metadata
from utils.methods import ParamFile, method_for
from utils.models import model_fingerprint

CONFIGS = ["NVFP4_FlatQuant_config", "MXFP4_FlatQuant_config"]


def flat_config(name="NVFP4_FlatQuant_config", block=None, **changes):
    config = load_config(name)
    config = replace(config, flat=replace(config.flat, **{"epochs": 2, "nsamples": 4, "cali_bsz": 2, **changes}))
    return config if block is None else replace(config, block=replace(config.block, **block))


def calibrate(config, calib_ids, path=None, mode="calibrate", model=None):
    model = model or tiny_llama()
    report = flat_quantize(model, config, calib_ids, path, "tiny", model_fingerprint(model), mode=mode, progress=False)
    return model, report


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def relative_error(out, reference):
    return ((out - reference).norm() / reference.norm()).item()


def awkward_tensor(rows=6, columns=64):
    """Outlier channels, a zero block and values spread over many binades."""
    x = torch.randn(rows, columns, generator=torch.Generator().manual_seed(3)) * torch.logspace(-3, 1, columns)
    x[:, 5] *= 40
    x[1, :32] = 0
    return x


@pytest.mark.parametrize("format_name", ["NVFP4", "MXFP4"])
def test_learnable_block_quantizer_is_the_format_bit_for_bit_and_passes_gradients(format_name):
    weight_scheme, input_scheme = BlockSettings(format_name).schemes()
    w = awkward_tensor().requires_grad_(True)
    learnable = LearnableBlockQuantizer(weight_scheme, clip=w.shape[0])
    with torch.no_grad():
        learnable.clip_max.copy_(torch.linspace(-1, 5, w.shape[0])[:, None])  # ratios 0.27 .. 0.99
    reference = BlockQuantizer.from_tensor(w.detach(), weight_scheme.element, weight_scheme.group_size,
                                           weight_scheme.scale, clip=torch.sigmoid(learnable.clip_max.detach()),
                                           rule=weight_scheme.rule)
    out = learnable(w)
    assert torch.equal(out, reference(w.detach()))
    (out * torch.randn_like(out)).sum().backward()
    assert torch.isfinite(w.grad).all() and (w.grad != 0).float().mean() > 0.9
    assert (learnable.clip_max.grad != 0).all()  # every row's clip ratio trains

    x = awkward_tensor(8).reshape(2, 4, 64)
    dynamic = BlockQuantizer(input_scheme.element, input_scheme.group_size, input_scheme.scale, dynamic=True,
                             rule=input_scheme.rule)
    assert torch.equal(LearnableBlockQuantizer(input_scheme)(x), dynamic(x))
    lac = LearnableBlockQuantizer(input_scheme, clip="scalar")
    lac(x).square().sum().backward()
    assert lac.clip_max.grad != 0


def test_learnable_input_four_over_six_is_the_deployed_choice_and_passes_gradients():
    input_scheme = BlockSettings("NVFP4", four_over_six_inputs=True).schemes()[1]
    x = awkward_tensor(8).reshape(2, 4, 64).requires_grad_(True)
    dynamic = BlockQuantizer(input_scheme.element, 16, "e4m3", dynamic=True, four_over_six=True)
    plain = BlockQuantizer(input_scheme.element, 16, "e4m3", dynamic=True)
    learnable = LearnableBlockQuantizer(input_scheme, clip="scalar")
    with torch.no_grad():
        learnable.clip_max.fill_(20.0)  # a clip ratio of 1 in float32: the deployed quantizer's blocks
    out = learnable(x)
    assert torch.equal(out, dynamic(x.detach())) and not torch.equal(out, plain(x.detach()))
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad != 0).float().mean() > 0.9


@pytest.mark.parametrize("name", CONFIGS)
def test_folded_model_without_quantizers_reproduces_full_precision(name, calib_ids):
    reference = logits(tiny_llama(), calib_ids)
    model, report = calibrate(flat_config(name), calib_ids)
    assert report.layers["model.layers.0"]["train_loss"], "the transforms were not trained"
    quantized = logits(model, calib_ids)
    set_quantized(model, False)
    assert relative_error(logits(model, calib_ids), reference) < 1e-4
    assert relative_error(quantized, reference) > 1e-3  # the quantizers were really on
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.input_transform is not None and getattr(model.model.layers[0].self_attn, "kv_quant", None) is None
    assert isinstance(q_proj.weight_quantizer, BlockQuantizer) and q_proj.act_quantizer.dynamic


def first_block_output(model, ids):
    captured = {}
    hook = model.model.layers[0].register_forward_hook(lambda _m, _args, out: captured.setdefault("out", out))
    logits(model, ids)
    hook.remove()
    out = captured["out"]
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("name", CONFIGS)
def test_training_beats_the_untrained_and_the_identity_transform(name, calib_ids):
    """The first block (same inputs in every model) of the deployed model is closer to full precision after
    training than with the untrained random transforms or with no transform at all."""
    reference = first_block_output(tiny_llama(), calib_ids)
    errors = {}
    for kind, changes in (("identity", {"transform": False, "lwc": False, "add_diag": False, "epochs": 0}),
                          ("untrained", {"epochs": 0}), ("trained", {"epochs": 8})):
        model, report = calibrate(flat_config(name, **changes), calib_ids)
        errors[kind] = relative_error(first_block_output(model, calib_ids), reference)
    history = report.layers["model.layers.0"]["train_loss"]
    assert history[-1] < history[0]
    assert errors["trained"] < errors["untrained"] and errors["trained"] < errors["identity"], errors


def test_learned_row_clip_sets_the_deployed_block_scales_and_fused_layers_share_tensor_scales(calib_ids, tmp_path):
    path = tmp_path / "m.safetensors"
    model, _ = calibrate(flat_config(epochs=3), calib_ids, path)
    saved = read_matrices(path, matrix_metadata(flat_config(), "tiny", model_fingerprint(tiny_llama())))
    attention, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    for linear, key in ((attention.k_proj, "self_attn.k_proj"), (mlp.down_proj, "mlp.down_proj")):
        clip = torch.sigmoid(saved[1][f"model.layers.1.{key}.weight_clip.max"])
        assert clip.shape == (linear.out_features, 1) and (clip != torch.sigmoid(torch.tensor(4.0))).any()
        quantizer = linear.weight_quantizer
        expected = BlockQuantizer.from_tensor(linear.weight.float(), quantizer.fmt, 16, "e4m3",
                                              tensor_scale=quantizer.tensor_scale, clip=clip)
        assert torch.equal(quantizer.scale, expected.scale)
    for fused in ((attention.q_proj, attention.k_proj, attention.v_proj), (mlp.gate_proj, mlp.up_proj)):
        for operand in ("weight_quantizer", "act_quantizer"):
            scales = [getattr(m, operand).tensor_scale for m in fused]
            assert all(torch.equal(s, scales[0]) for s in scales)


@pytest.mark.parametrize("name,block", [("NVFP4_FlatQuant_GPTQ_config", {"layer_errors": True}),
                                        ("NVFP4_FlatQuant_config", {"search": True}),
                                        ("MXFP4_FlatQuant_config", {"search": True})])
def test_gptq_and_clip_search_lower_every_layers_output_error(name, block, calib_ids):
    config = flat_config(name, block)
    config = replace(config, search=replace(config.search, n_candidates=12, strategy="coarse"))
    _, report = calibrate(config, calib_ids)
    errors = {path: entry for path, entry in report.layers.items() if "proj" in path}
    assert len(errors) == 2 * 7
    for path, entry in errors.items():
        assert entry["output_error"] < entry["rtn_output_error"], path


@pytest.mark.parametrize("name", ["NVFP4_FlatQuant_config", "NVFP4_FlatQuant_GPTQ_config", "MXFP4_FlatQuant_config"])
def test_matrix_file_reloads_bit_identically(name, calib_ids, tmp_path):
    path = tmp_path / "m.safetensors"
    config = flat_config(name)
    model = tiny_llama()
    quantize(model, config, calib_ids, progress=False, files=ParamFile(path, "calibrate", "tiny"))
    fresh = tiny_llama()
    report = quantize(fresh, config, calib_ids, progress=False, files=ParamFile(path, "reload", "tiny"))
    assert report.layers["model.layers.0"]["train_loss"] == []
    assert torch.equal(logits(fresh, calib_ids), logits(model, calib_ids))


def test_transforms_train_through_input_four_over_six_and_their_file_says_so(calib_ids, tmp_path):
    adaptive, plain = tmp_path / "in46.safetensors", tmp_path / "plain.safetensors"
    config = flat_config(block={"four_over_six_inputs": True})
    model, report = calibrate(config, calib_ids, adaptive)
    _, plain_report = calibrate(flat_config(), calib_ids, plain)
    assert report.layers["model.layers.0"]["train_loss"] != plain_report.layers["model.layers.0"]["train_loss"]
    assert model.model.layers[0].self_attn.q_proj.act_quantizer.four_over_six
    with pytest.raises(MatrixFileError, match="four_over_six_inputs=True, not None"):
        calibrate(flat_config(), calib_ids, adaptive, mode="reload")
    with pytest.raises(MatrixFileError, match="four_over_six_inputs=None, not True"):
        calibrate(config, calib_ids, plain, mode="reload")


def test_matrix_file_of_another_format_is_refused(calib_ids, tmp_path):
    nvfp4, mxfp4, integer = tmp_path / "nv.safetensors", tmp_path / "mx.safetensors", tmp_path / "int.safetensors"
    calibrate(flat_config(epochs=0), calib_ids, nvfp4)
    with pytest.raises(MatrixFileError, match="named_format=NVFP4, not MXFP4"):
        calibrate(flat_config("MXFP4_FlatQuant_config"), calib_ids, nvfp4, mode="reload")
    with pytest.raises(MatrixFileError, match="named_format=NVFP4, not None"):
        calibrate(flat_config("FlatQuant_config_llama"), calib_ids, nvfp4, mode="reload")
    calibrate(flat_config("FlatQuant_config_llama", epochs=0), calib_ids, integer)
    with pytest.raises(MatrixFileError, match="named_format=None, not NVFP4"):
        calibrate(flat_config(), calib_ids, integer, mode="reload")
    calibrate(flat_config("MXFP4_FlatQuant_config", epochs=0), calib_ids, mxfp4)
    with pytest.raises(MatrixFileError, match="named_format=MXFP4, not NVFP4"):
        calibrate(flat_config(), calib_ids, mxfp4, mode="reload")


@pytest.mark.parametrize("changes,message", [({"k_bits": 4}, "not the KV cache"),
                                             ({"weight_quantizer": "fpq_search"}, "format search"),
                                             ({"w_asym": True}, "symmetric"), ({"w_groupsize": 32}, "weight groups")])
def test_settings_a_named_format_cannot_honour_are_refused(changes, message):
    with pytest.raises(UsageError, match=message):
        method_for(flat_config(**changes))
    with pytest.raises(UsageError, match="replace the Hadamard"):
        method_for(flat_config(block={"hadamard": True}))


def test_a_block_that_does_not_divide_a_layer_is_refused_before_training(calib_ids):
    config = flat_config(block={"format": "W4A4_G128"})  # groups of 128; the tiny model's layers read 64 inputs
    with pytest.raises(UsageError, match="blocks of 128 do not divide the 64 inputs of model.layers.0"):
        calibrate(config, calib_ids)
