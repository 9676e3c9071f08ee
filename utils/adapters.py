"""Model families as data: where a transformers causal LM keeps its blocks, linears, norms and attention, and
how a per-channel scale of a linear group's input folds into the module that produces that input.

An adapter never re-implements a forward pass; adding a family is one `ModelAdapter` entry in ADAPTERS
(see README "Adding a model family").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import UserError

# How a norm applies its weight w to the normalised input n, and so how a per-channel scale s folds into it:
NORM_KINDS = {
    "rms": "n * w: w <- w * s",  # LLaMA, Mistral, Qwen2/3
    "rms_one_plus": "n * (1 + w): w <- (1 + w) * s - 1",  # Gemma
    "layer": "n * w + b: w <- w * s, b <- b * s",  # LayerNorm
}
# Where a linear group's input comes from, and so where a per-channel scale of that input folds:
FOLD_KINDS = {
    "norm": "the output of a norm of the adapter's norm kind: into its weight (and bias)",
    "rows": "the output of another linear (up_proj feeding down_proj): into that linear's output rows",
    "heads": "attention heads (o_proj): no per-channel scale; a transform is heads x head_dim, its head_dim "
             "factor carried by the value projection's output heads",
}


@dataclass(frozen=True)
class LinearGroup:
    """Linears of a decoder block that read one input, the module that produces it, and how a scale folds."""
    linears: tuple[str, ...]
    source: str  # path in the block of the module whose output is the group's input
    fold: str  # a key of FOLD_KINDS

    def __post_init__(self):
        if self.fold not in FOLD_KINDS:
            raise ValueError(f"fold must be one of {tuple(FOLD_KINDS)}, got {self.fold!r}")


@dataclass(frozen=True)
class ModelAdapter:
    """Paths are relative to the model (layers, embedding, final_norm, lm_head) or to a block (the rest)."""
    groups: tuple[LinearGroup, ...]  # in execution order
    attention: str  # the attention module of a block (the KV path's quantizers hang on it)
    norm: str = "rms"  # a key of NORM_KINDS: how this family's norms apply their weight
    layers: str = "model.layers"
    embedding: str = "model.embed_tokens"
    embedding_scale: str | None = None  # attribute of the embedding that scales its output (Gemma: sqrt(hidden))
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"

    def __post_init__(self):
        if self.norm not in NORM_KINDS:
            raise ValueError(f"norm must be one of {tuple(NORM_KINDS)}, got {self.norm!r}")

    @property
    def linear_groups(self) -> tuple[tuple[str, ...], ...]:
        return tuple(group.linears for group in self.groups)

    @property
    def value_proj(self) -> str | None:
        """The linear whose output heads carry o_proj's head_dim factor (the source of the "heads" group)."""
        return next((group.source for group in self.groups if group.fold == "heads"), None)


def _attention_and_mlp(pre_mlp_norm: str) -> tuple[LinearGroup, ...]:
    return (LinearGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm", "norm"),
            LinearGroup(("self_attn.o_proj",), "self_attn.v_proj", "heads"),
            LinearGroup(("mlp.gate_proj", "mlp.up_proj"), pre_mlp_norm, "norm"),
            LinearGroup(("mlp.down_proj",), "mlp.up_proj", "rows"))


# Qwen2's q/k/v biases and Qwen3's per-head q/k norms (after q_proj/k_proj, before RoPE) need nothing more.
LLAMA_LIKE = ModelAdapter(_attention_and_mlp("post_attention_layernorm"), attention="self_attn")
# Gemma 3: (1 + w) RMSNorms; sandwich norms (post_attention_layernorm and post_feedforward_layernorm act on
# block outputs, not on linear inputs, so the MLP reads pre_feedforward_layernorm); scaled embedding.
GEMMA3 = ModelAdapter(_attention_and_mlp("pre_feedforward_layernorm"), attention="self_attn", norm="rms_one_plus",
                      embedding_scale="embed_scale")
# model_type of the HF config -> adapter
ADAPTERS = {"llama": LLAMA_LIKE, "mistral": LLAMA_LIKE, "qwen2": LLAMA_LIKE, "qwen3": LLAMA_LIKE,
            "gemma3_text": GEMMA3}


class UnsupportedModel(UserError, ValueError):
    pass


def adapter_for(model) -> ModelAdapter:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedModel(f"no adapter for model type {model_type!r}; supported: {', '.join(sorted(ADAPTERS))} "
                               "(add a ModelAdapter entry to ADAPTERS in utils/adapters.py)")
    return ADAPTERS[model_type]


@dataclass(frozen=True)
class Dims:
    heads: int
    kv_heads: int
    head_dim: int


def model_dims(model) -> Dims:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return Dims(cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", cfg.num_attention_heads), head_dim)


@torch.no_grad()
def fold_scale_into_norm(norm: nn.Module, scale: torch.Tensor, kind: str):
    """Make `norm`'s output equal its old output times `scale` (per channel), computed in float64."""
    scale = scale.double()
    weight = norm.weight.double()
    if kind == "rms_one_plus":
        folded = (1 + weight) * scale - 1
    else:
        folded = weight * scale
        if kind == "layer" and getattr(norm, "bias", None) is not None:
            norm.bias.data = (norm.bias.double() * scale).to(norm.bias.dtype)
    norm.weight.data = folded.to(norm.weight.dtype)
