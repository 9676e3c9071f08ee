"""FlatQuant's calibration driver on a tiny random LLaMA (fast): folding is exact, the matrix file reloads
bit-identically and refuses other settings, an interrupted run resumes to the same result, GPTQ and the FP4
search run through the same driver."""
from dataclasses import replace

import pytest
import torch

from configs import load_config
from conftest import tiny_causal_lm, tiny_llama
from quant_layers import QuantLinear
from utils.calibrate import quantize, set_quantized
from utils.flatquant import MatrixFileError, flat_quantize, read_matrices, write_matrices, matrix_metadata
from utils.models import model_fingerprint


def flat_config(name="FlatQuant_config_llama", **changes):
    config = load_config(name)
    bits = {k: changes.pop(k) for k in ("w_bits", "a_bits") if k in changes}
    return replace(config, flat=replace(config.flat, **{"epochs": 2, "nsamples": 4, "cali_bsz": 2, **changes}), **bits)


def calibrate(config, calib_ids, path, mode="calibrate", model=None):
    model = model or tiny_llama()
    fingerprint = model_fingerprint(model)
    report = flat_quantize(model, config, calib_ids, path, "tiny", fingerprint, mode=mode, progress=False)
    return model, report


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("direct", [False, True])
def test_folded_model_without_quantizers_reproduces_full_precision_logits(direct, calib_ids, tmp_path):
    ids = calib_ids[:2]
    reference = logits(tiny_llama(), ids)
    config = flat_config(w_bits=16, direct_inv=direct)  # activations and KV quantized: every transform trained
    model, report = calibrate(config, calib_ids, tmp_path / "m.safetensors")
    assert report.layers["model.layers.0"]["train_loss"], "the transforms were not trained"
    quantized = logits(model, ids)
    set_quantized(model, False)
    off = logits(model, ids)
    assert (off - reference).norm() / reference.norm() < 1e-4
    assert (quantized - reference).norm() / reference.norm() > 1e-3  # the quantizers were really on


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_other_families_fold_exactly(family, calib_ids, tmp_path):
    """Qwen2's q/k/v biases (the value bias turns with its heads) and Mistral go through the same adapter."""
    ids = calib_ids[:2]
    reference = logits(tiny_causal_lm(family), ids)
    model = tiny_causal_lm(family)
    assert model.model.layers[0].self_attn.v_proj.bias is not None or family == "mistral"
    flat_quantize(model, flat_config(w_bits=16), calib_ids, tmp_path / "m.safetensors", family,
                  model_fingerprint(model), progress=False)
    quantized = logits(model, ids)
    set_quantized(model, False)
    off = logits(model, ids)
    assert (off - reference).norm() / reference.norm() < 1e-4
    assert (quantized - reference).norm() / reference.norm() > 1e-3


def test_training_lowers_the_block_loss(calib_ids, tmp_path):
    _, report = calibrate(flat_config(epochs=6), calib_ids, tmp_path / "m.safetensors")
    for index in range(2):
        history = report.layers[f"model.layers.{index}"]["train_loss"]
        assert history[-1] < history[0]


def test_reload_matrix_reproduces_the_calibrated_model_exactly(calib_ids, tmp_path):
    path = tmp_path / "m.safetensors"
    model, _ = calibrate(flat_config(), calib_ids, path)
    reloaded, report = calibrate(flat_config(), calib_ids, path, mode="reload")
    assert report.layers["model.layers.0"]["train_loss"] == []
    assert torch.equal(logits(model, calib_ids), logits(reloaded, calib_ids))


def test_resume_finishes_an_interrupted_run_identically(calib_ids, tmp_path):
    path = tmp_path / "m.safetensors"
    model, _ = calibrate(flat_config(), calib_ids, path)
    config = flat_config()
    metadata = matrix_metadata(config, "tiny", model_fingerprint(tiny_llama()))
    blocks = read_matrices(path, metadata)
    write_matrices(path, metadata, {0: ("model.layers.0", blocks[0])})  # as if killed during block 1
    with pytest.raises(MatrixFileError, match="1 of 2 blocks"):
        calibrate(config, calib_ids, path, mode="reload")
    resumed, report = calibrate(config, calib_ids, path, mode="resume")
    assert report.layers["model.layers.0"]["train_loss"] == [] and report.layers["model.layers.1"]["train_loss"]
    assert torch.equal(logits(model, calib_ids), logits(resumed, calib_ids))


def test_matrix_file_of_other_settings_or_model_is_refused(calib_ids, tmp_path):
    path = tmp_path / "m.safetensors"
    calibrate(flat_config(), calib_ids, path)
    with pytest.raises(MatrixFileError, match="add_diag"):
        calibrate(flat_config(add_diag=False), calib_ids, path, mode="reload")
    other = tiny_llama(seed=5)
    with pytest.raises(MatrixFileError, match="another model"):
        calibrate(flat_config(), calib_ids, path, mode="reload", model=other)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(MatrixFileError, match="not a FlatQuant matrix file"):
        calibrate(flat_config(), calib_ids, path, mode="reload")


@pytest.mark.parametrize("weights", ["gptq", "fpq_search"])
def test_gptq_and_fp4_search_run_through_the_driver(weights, calib_ids, tmp_path):
    name = "FlatQuant_FP_config_llama" if weights == "fpq_search" else "FlatQuant_config_llama"
    config = flat_config(name, weight_quantizer=weights)
    if weights == "fpq_search":
        config = replace(config, search=replace(config.search, n_candidates=10, rounds=1))
    model, report = calibrate(config, calib_ids, tmp_path / "m.safetensors")
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.input_transform is not None and q_proj.act_quantizer is not None
    assert torch.isfinite(logits(model, calib_ids)).all()
    assert all(v["loss"] >= 0 for k, v in report.layers.items() if "proj" in k)


@pytest.mark.parametrize("name", ["FlatQuant_config_llama", "FlatQuant_FP_config_llama"])
def test_library_entry_point_runs_flatquant_configs(name, calib_ids):
    model = tiny_llama()
    reference = logits(model, calib_ids)
    config = flat_config(name)
    config = replace(config, search=replace(config.search, n_candidates=6, rounds=1))
    report = quantize(model, config, calib_ids, progress=False)
    out = logits(model, calib_ids)
    assert torch.isfinite(out).all() and not torch.allclose(out, reference)
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 2 * 7 and all(m.quantize and m.input_transform is not None for m in linears)
    assert isinstance(model.lm_head, torch.nn.Linear) and len(report.block_seconds) == 2
    attention = model.model.layers[0].self_attn
    assert attention.kv_quant.k_quantizer is not None and attention.kv_quant.v_quantizer is not None


def test_kv_group_sizes_are_honoured(calib_ids):
    model = tiny_llama()
    quantize(model, flat_config(k_groupsize=8, v_groupsize=4, q_bits=4, epochs=0), calib_ids, progress=False)
    kv = model.model.layers[1].self_attn.kv_quant
    assert (kv.k_quantizer.groupsize, kv.v_quantizer.groupsize, kv.q_quantizer.groupsize) == (8, 4, -1)
    keys = torch.randn(1, 2, 3, 16)
    keys[..., 0] = 100.0  # an outlier in the first group of 8 must not coarsen the second group
    second = kv.k_quantizer(keys)[..., 8:]
    assert (second - keys[..., 8:]).abs().max() < 0.5 * keys[..., 8:].abs().max() / 7


def test_kv_group_size_that_does_not_divide_head_dim_is_refused(calib_ids, tmp_path):
    with pytest.raises(ValueError, match="does not divide head_dim 16"):
        calibrate(flat_config(k_groupsize=12), calib_ids, tmp_path / "m.safetensors")
