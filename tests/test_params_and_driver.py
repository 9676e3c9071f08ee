from dataclasses import replace

import pytest
import torch
from conftest import tiny_llama

from configs import available, load_config
from quant_layers import QuantEmbedding, QuantLinear
from utils.calibrate import prepare_model, quant_modules, quantize, set_quantized
from utils.models import UnsupportedModel, adapter_for, model_fingerprint
from utils.params import ParamFileError, load_params, save_params


def small(config_name, **search):
    config = load_config(config_name)
    return replace(config, search=replace(config.search, n_candidates=6, rounds=2, **search))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("name", [n for n in available()  # FlatQuant: test_flatquant_*; formats: test_block_methods
                                  if not n.startswith("FlatQuant") and load_config(n).block is None])
def test_every_config_calibrates_and_changes_the_output(name, tiny_model, calib_ids):
    reference = logits(tiny_model, calib_ids)
    report = quantize(tiny_model, small(name), calib_ids, progress=False)
    quantized = logits(tiny_model, calib_ids)
    assert torch.isfinite(quantized).all() and not torch.allclose(quantized, reference)
    modules = quant_modules(tiny_model)
    assert sum(isinstance(m, QuantLinear) for m in modules.values()) == 2 * 7 + 1
    assert any(isinstance(m, QuantEmbedding) for m in modules.values())
    assert all(m.quantize for m in modules.values())
    for layer in report.layers.values():
        if layer:
            assert layer["searched"] <= layer["minmax"] * (1 + 1e-6)


def test_tied_embedding_and_lm_head_are_quantized_independently(tiny_model, calib_ids):
    assert tiny_model.lm_head.weight is tiny_model.model.embed_tokens.weight
    config = replace(small("FPQ_config_llama"), e_bits=8, e_exp=4)
    quantize(tiny_model, config, calib_ids, progress=False)
    head, table = tiny_model.lm_head, tiny_model.model.embed_tokens
    assert head.weight is not table.weight
    assert torch.equal(head.weight, table.weight)  # untied, not changed
    assert not torch.equal(head.quantized_weight, table.quantized_weight)


def test_save_and_reload_is_bit_identical(tiny_model, calib_ids, tmp_path):
    config = small("FPQ_config_llama")
    quantize(tiny_model, config, calib_ids, progress=False)
    path = save_params(tmp_path / "p.safetensors", tiny_model, config, "tiny")
    fresh = tiny_llama()
    prepare_model(fresh, config)
    load_params(path, fresh, config)
    assert torch.equal(logits(fresh, calib_ids), logits(tiny_model, calib_ids))


def test_released_originals_keep_outputs_and_parameter_files(tiny_model, calib_ids, tmp_path):
    config = small("FPQ_config_llama")
    kept = tiny_llama()
    quantize(kept, config, calib_ids, progress=False)
    fingerprint = model_fingerprint(tiny_model)
    quantize(tiny_model, config, calib_ids, progress=False, release_originals=True)
    assert torch.equal(logits(tiny_model, calib_ids), logits(kept, calib_ids))
    modules = quant_modules(tiny_model).values()
    assert all(m.released and m.weight.data_ptr() == m.quantized_weight.data_ptr() for m in modules)
    with pytest.raises(ValueError, match="take its fingerprint before"):
        model_fingerprint(tiny_model)
    set_quantized(tiny_model, False)
    with pytest.raises(RuntimeError, match="released"):
        logits(tiny_model, calib_ids)
    path = save_params(tmp_path / "p.safetensors", tiny_model, config, "tiny", fingerprint=fingerprint)
    fresh = tiny_llama()
    prepare_model(fresh, config)
    load_params(path, fresh, config)
    assert torch.equal(logits(fresh, calib_ids), logits(kept, calib_ids))


def test_param_files_from_other_models_configs_or_corrupt_are_refused(tiny_model, calib_ids, tmp_path):
    config = small("FPQ_baseline_config_llama")
    quantize(tiny_model, config, calib_ids, progress=False)
    path = save_params(tmp_path / "p.safetensors", tiny_model, config, "tiny")

    other = tiny_llama(seed=1)
    prepare_model(other, config)
    with pytest.raises(ParamFileError, match="another model"):
        load_params(path, other, config)
    with pytest.raises(ParamFileError, match="another model"):
        save_params(path, other, config, "tiny-2")  # never overwrite another model's run

    same = tiny_llama()
    fpq = small("FPQ_config_llama")
    prepare_model(same, fpq)
    with pytest.raises(ParamFileError, match="same --quant_config"):
        load_params(path, same, fpq)
    with pytest.raises(ParamFileError, match="same --quant_config"):
        load_params(path, same, fpq.with_qbits([4, 8, 4, 2, 4, 2]))

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ParamFileError):
        load_params(corrupt, same, config)
    with pytest.raises(ParamFileError, match="does not exist"):
        load_params(tmp_path / "missing.safetensors", same, config)


def test_reference_pt_layout_is_read_with_weights_only(tiny_model, calib_ids, tmp_path):
    """Write a file in the reference code's layout (spec 5.4) and check it reproduces our quantizers."""
    config = small("FPQ_simulated_config_llama")
    quantize(tiny_model, config, calib_ids, progress=False)
    state = {}
    for name, module in quant_modules(tiny_model).items():
        fmt = module.weight_quantizer.fmt
        if isinstance(module, QuantEmbedding):
            state.update({f"{name}.exponent_bit": torch.tensor(fmt.exponent_bits),
                          f"{name}.mantissa_bit": torch.tensor(fmt.mantissa_bits),
                          f"{name}.interval": module.weight_quantizer.bias.reshape(-1, 1, 1, 1)})
            continue
        a = module.act_quantizer
        shift = torch.round(a.bias - a.bias.min())  # our biases are rho + k with k >= 0 integers
        rho = (a.bias - shift).mean()
        state.update({f"{name}.w_exponent_bit": torch.tensor(fmt.exponent_bits),
                      f"{name}.w_mantissa_bit": torch.tensor(fmt.mantissa_bits),
                      f"{name}.a_exponent_bit": torch.tensor(a.fmt.exponent_bits),
                      f"{name}.a_mantissa_bit": torch.tensor(a.fmt.mantissa_bits),
                      f"{name}.w_interval": module.weight_quantizer.bias.reshape(-1, 1, 1, 1),
                      f"{name}.a_interval": rho.reshape(1, 1),
                      f"{name}.a_interval_zero_point": torch.round(rho).reshape(1, 1),
                      f"{name}.a_bias": (shift + torch.round(rho)).reshape(-1, 1)})
    path = tmp_path / "reference.pt"
    torch.save(state, path)
    fresh = tiny_llama()
    prepare_model(fresh, config)
    load_params(path, fresh, config)
    torch.testing.assert_close(logits(fresh, calib_ids), logits(tiny_model, calib_ids), rtol=1e-4, atol=1e-4)


def test_model_family_without_adapter_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModel, match="no adapter for model type 'gpt2'"):
        adapter_for(model)


@pytest.mark.parametrize("name", ["FPQ_baseline_config_llama", "NVFP4_GPTQ_config"])
def test_calibration_runs_the_configured_attention_and_gives_the_model_its_own_back(name, calib_ids):
    """Every calibration forward (block inputs' capture, blocks, feeding) sees the configured implementation, with
    the masks built for it; the model's own comes back afterwards, and after a failure too."""
    seen = []
    model = tiny_llama()
    own = model.config._attn_implementation
    model.model.layers[1].self_attn.register_forward_pre_hook(lambda m, a: seen.append(m.config._attn_implementation))
    quantize(model, replace(small(name), calib_attention="eager"), calib_ids, progress=False)
    assert seen and set(seen) == {"eager"} and model.config._attn_implementation == own == "sdpa"

    failing = tiny_llama()
    failing.model.layers[1].register_forward_pre_hook(lambda *_: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        quantize(failing, replace(small(name), calib_attention="eager"), calib_ids, progress=False)
    assert failing.config._attn_implementation == own


def test_the_calibration_attention_names_the_parameter_file():
    from utils.methods import method_for
    fingerprint = {"shapes": "0" * 16}
    for name in ("FPQ_config_llama", "NVFP4_config"):
        config = load_config(name)
        paths = {attention: method_for(config).default_path("root", replace(config, calib_attention=attention),
                                                            "m", fingerprint, "calib")
                 for attention in (None, "eager", "sdpa")}
        assert len(set(paths.values())) == 3 and "attn-eager" in paths["eager"].name, paths


def test_feed_quantized_changes_later_blocks(calib_ids):
    results = []
    for feed in (False, True):
        model = tiny_llama()
        config = replace(small("FPQ_baseline_config_llama"), feed_quantized=feed)
        quantize(model, config, calib_ids, progress=False)
        results.append(model.model.layers[1].self_attn.q_proj.act_quantizer.bias.clone())
    assert not torch.equal(*results)
