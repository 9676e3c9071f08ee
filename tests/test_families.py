"""Model families through their adapters: Gemma 3 ((1 + w) RMSNorm, sandwich norms, scaled embedding, sliding
and full attention layers), Qwen3 (per-head q/k norms), and a family registered from outside the table."""
from dataclasses import replace

import pytest
import torch

from configs import load_config
from utils import adapters
from utils.calibrate import quantize, set_quantized
from utils.flatquant import flat_quantize
from utils.models import model_fingerprint
from utils.pipeline import capture_block_inputs, run_block


def tiny(family: str, seed=0):
    import transformers
    torch.manual_seed(seed)
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
    if family == "gemma3":
        # a window shorter than the windows below, so sliding and full layers see different masks
        config = transformers.Gemma3TextConfig(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                               layer_types=["sliding_attention", "full_attention", "sliding_attention"])
        model = transformers.Gemma3ForCausalLM(config)
    elif family == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=16))
    else:
        model = transformers.GraniteForCausalLM(transformers.GraniteConfig(**common, embedding_multiplier=2.0,
                                                                            residual_multiplier=0.5))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # Gemma's norms start at w = 0, where (1 + w) and w folds would not differ much
                param.normal_(0.2, 0.3)
        model.model.embed_tokens.weight[:, 5] *= 20
    return model.eval().requires_grad_(False)


@pytest.fixture
def ids():
    return torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(1))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_each_block_runs_with_its_own_masks_and_rotary_embeddings(ids):
    """Block by block on captured inputs equals the whole model's hidden states, layer by layer (Gemma 3's full
    attention layer gets its own mask and rotary base, not the first, sliding, layer's)."""
    model = tiny("gemma3")
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True).hidden_states
        captured = capture_block_inputs(model, adapters.adapter_for(model), ids, batch_size=2)
        hidden = captured.hidden
        for index, block in enumerate(model.model.layers):
            hidden = run_block(block, hidden, captured.call_kwargs[index], batch_size=2)
            if index < len(model.model.layers) - 1:  # the last hidden state is after the final norm
                assert torch.allclose(hidden, expected[index + 1], atol=1e-5, rtol=1e-5), f"block {index}"
    assert captured.call_kwargs[0]["attention_mask"] is not captured.call_kwargs[1]["attention_mask"]


def flat_config(**changes):
    config = load_config("FlatQuant_config_llama")
    return replace(config, w_bits=16, flat=replace(config.flat, epochs=2, nsamples=4, cali_bsz=2, **changes))


@pytest.mark.parametrize("family", ["gemma3", "qwen3"])
def test_flatquant_folds_exactly(family, ids, tmp_path):
    """Every quantizer off, the folded model gives the full-precision logits. For Gemma the per-channel scales
    fold into (1 + w) norms: folding them as LLaMA's w fails this test."""
    reference = logits(tiny(family), ids[:2])
    model = tiny(family)
    flat_quantize(model, flat_config(), ids, tmp_path / "m.safetensors", family, model_fingerprint(model),
                  progress=False)
    quantized = logits(model, ids[:2])
    set_quantized(model, False)
    off = logits(model, ids[:2])
    assert (off - reference).norm() / reference.norm() < 1e-4
    assert (quantized - reference).norm() / reference.norm() > 1e-3  # the quantizers were really on


def test_gemma_norm_fold_differs_from_llama_fold():
    norm = tiny("gemma3").model.layers[0].input_layernorm
    x, scale = torch.randn(3, 64), torch.rand(64) + 0.5
    expected = norm(x) * scale
    adapters.fold_scale_into_norm(norm, scale, "rms_one_plus")
    assert torch.allclose(norm(x), expected, atol=1e-5)
    llama_style = tiny("gemma3").model.layers[0].input_layernorm
    adapters.fold_scale_into_norm(llama_style, scale, "rms")
    assert not torch.allclose(llama_style(x), expected, atol=1e-3)


@pytest.mark.parametrize("family", ["gemma3", "qwen3"])
def test_llm_fp4_runs_on_the_family(family, ids):
    """MinMax FP8 everywhere stays near full precision (0.11 / 0.04 relative logit error on these random models;
    0.81 for Gemma when the embedding loses its sqrt(hidden) scale)."""
    reference = logits(tiny(family), ids[:2])
    model = tiny(family)
    config = load_config("MinMax_config_llama").with_qbits([8, 8, 8, 4, 4, 4])
    quantize(model, config, ids, progress=False)
    error = (logits(model, ids[:2]) - reference).norm() / reference.norm()
    assert 0 < error < 0.2


def test_a_family_registered_from_outside_the_table(ids, tmp_path, monkeypatch):
    """Granite is LLaMA-shaped with multipliers the model applies itself: one table entry makes it work."""
    with pytest.raises(adapters.UnsupportedModel, match="add a ModelAdapter entry"):
        adapters.adapter_for(tiny("granite"))
    monkeypatch.setitem(adapters.ADAPTERS, "granite", adapters.LLAMA_LIKE)
    reference = logits(tiny("granite"), ids[:2])
    model = tiny("granite")
    flat_quantize(model, flat_config(), ids, tmp_path / "m.safetensors", "granite", model_fingerprint(model),
                  progress=False)
    set_quantized(model, False)
    assert (logits(model, ids[:2]) - reference).norm() / reference.norm() < 1e-4


def test_layernorm_fold_scales_weight_and_bias():
    norm = torch.nn.LayerNorm(64)
    with torch.no_grad():
        norm.weight.normal_(1, 0.3)
        norm.bias.normal_(0, 0.3)
    x, scale = torch.randn(3, 64), torch.rand(64) + 0.5
    expected = norm(x) * scale
    adapters.fold_scale_into_norm(norm, scale, "layer")
    assert torch.allclose(norm(x), expected, atol=1e-5)
