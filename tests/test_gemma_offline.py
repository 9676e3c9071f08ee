"""The third real model family: Gemma 3 270M base ((1 + w) RMSNorm, sandwich norms, scaled and tied embedding,
GQA with one KV head, sliding and full attention layers, a 262,144-token vocabulary).

Its GGUF (238 MB) is opt-in, so this runs only where it was fetched with `python -m utils.assets
gemma3-270m-gguf`; elsewhere it is skipped (tests/test_families.py covers the same mechanics on a tiny
random Gemma 3 in every run).
"""
from dataclasses import replace

import pytest
import torch
from torch import nn

from configs import load_config
from utils.assets import AssetError, asset_path
from utils.calibrate import quantize, set_quantized
from utils.data import calibration_samples, evaluation_tokens
from utils.evaluation import perplexity
from utils.flatquant import flat_quantize
from utils.models import GEMMA_OFFLINE_MODEL, OFFLINE_MODELS, adapter_for, get_module, load_model, model_fingerprint

try:
    asset_path(OFFLINE_MODELS[GEMMA_OFFLINE_MODEL][0], fetch=False)
except AssetError as error:
    pytest.skip(f"opt-in asset not fetched: {error}", allow_module_level=True)


def gemma():
    return load_model(GEMMA_OFFLINE_MODEL, "float32", "cpu")


def test_architecture_and_adapter():
    model, _ = gemma()
    assert model.config.model_type == "gemma3_text" and model.config.tie_word_embeddings
    assert set(model.config.layer_types) == {"sliding_attention", "full_attention"}
    adapter = adapter_for(model)
    assert adapter.norm == "rms_one_plus"
    layers = get_module(model, adapter.layers)
    assert len(layers) == 18
    for group in adapter.groups:
        assert type(get_module(layers[0], group.source)).__name__ in ("Gemma3RMSNorm", "Linear")
        for path in group.linears:
            assert isinstance(get_module(layers[0], path), nn.Linear)
    assert float(getattr(get_module(model, adapter.embedding), adapter.embedding_scale)) == pytest.approx(640 ** 0.5)


def test_flatquant_folds_exactly():
    """FlatQuant (transforms, per-channel scales folded into (1 + w) norms, quantized KV): with every quantizer
    off, the folded model gives the full-precision logits."""
    model, tokenizer = gemma()
    calib = calibration_samples(tokenizer, "enwiki", 2, 64, seed=0)
    with torch.no_grad():
        reference = model(calib[:1]).logits
    config = load_config("FlatQuant_config_llama")
    config = replace(config, w_bits=16, flat=replace(config.flat, epochs=1, nsamples=2, cali_bsz=1))
    flat_quantize(model, config, calib, None, "gemma", model_fingerprint(model), progress=False)
    set_quantized(model, False)
    with torch.no_grad():
        off = model(calib[:1]).logits
    assert (off - reference).norm() / reference.norm() < 1e-4


def test_fpq_calibrates_the_blocks():
    """LLM-FP4's FPQ W4A4 on every decoder linear (embedding and the 262,144-row head left in full precision
    to keep this test short)."""
    model, tokenizer = gemma()
    calib = calibration_samples(tokenizer, "enwiki", 2, 64, seed=0)
    tokens = evaluation_tokens(tokenizer, "enwiki-heldout")
    fp = perplexity(model, tokens, seqlen=128, max_windows=4, progress=False)
    config = replace(load_config("FPQ_config_llama").with_qbits([4, 4, 16, 2, 2, 2]), quantize_lm_head=False)
    config = replace(config, search=replace(config.search, rounds=1, n_candidates=10, strategy="coarse"))
    quantize(model, config, calib, progress=False, release_originals=True)
    quantized = perplexity(model, tokens, seqlen=128, max_windows=4, progress=False)
    assert fp < quantized < 20 * fp, (fp, quantized)
