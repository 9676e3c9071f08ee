import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def tiny_llama(seed=0, tie=True):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                         max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # outlier channels, as in real LLM activations
        model.model.embed_tokens.weight[:, 5] *= 20
    model.requires_grad_(False)
    return model


def tiny_causal_lm(family: str, seed=0):
    """A tiny random model of another supported family: "qwen2" (q/k/v biases, untied) or "mistral"."""
    import transformers
    config_class, model_class = {"qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                                 "mistral": ("MistralConfig", "MistralForCausalLM")}[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):  # transformers initialises biases to zero: make them matter
                param.normal_(0, 0.5)
        model.model.embed_tokens.weight[:, 5] *= 20
    model.requires_grad_(False)
    return model


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture
def calib_ids():
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
