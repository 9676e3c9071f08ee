"""Loading causal LMs (hub, local folder, or an offline GGUF: SmolLM2, Qwen2.5-Coder) and declarative adapters.

An adapter names where things are in a transformers model; it never re-implements a forward pass.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
from dataclasses import dataclass

import torch
from torch import nn

from .assets import asset_path, cache_dir
from .errors import UsageError, UserError

OFFLINE_MODEL = "smollm2-135m-offline"  # the default model: the asset `python -m utils.assets` fetches
QWEN_OFFLINE_MODEL = "qwen2.5-coder-0.5b-offline"  # opt-in: `python -m utils.assets qwen2.5-coder-0.5b-gguf`
# offline model name -> (GGUF asset in utils/assets.py, folder of the converted model under <cache>/models)
OFFLINE_MODELS = {OFFLINE_MODEL: ("smollm2-gguf", "SmolLM2-135M-Instruct"),
                  QWEN_OFFLINE_MODEL: ("qwen2.5-coder-0.5b-gguf", "Qwen2.5-Coder-0.5B-Instruct")}


@dataclass(frozen=True)
class ModelAdapter:
    layers: str = "model.layers"
    embedding: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    # Linears of a decoder block, grouped by the input they share, in execution order.
    linear_groups: tuple[tuple[str, ...], ...] = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    )
    # FlatQuant (spec A.3): the module whose output each group reads, where that group's per-channel scale
    # folds (a norm's weight, or a linear's output rows); None: o_proj, whose input transform is heads x
    # head_dim with the head_dim factor carried by the value projection's output heads.
    scale_into: tuple[str | None, ...] = ("input_layernorm", None, "post_attention_layernorm", "mlp.up_proj")
    attention: str = "self_attn"
    value_proj: str = "self_attn.v_proj"


LLAMA_LIKE = ModelAdapter()
# model_type (from the HF config) -> adapter. Qwen2's q/k/v biases need no special handling.
ADAPTERS = {"llama": LLAMA_LIKE, "mistral": LLAMA_LIKE, "qwen2": LLAMA_LIKE, "qwen3": LLAMA_LIKE}


class UnsupportedModel(UserError, ValueError):
    pass


class ModelUnavailable(UserError, OSError):
    pass


def adapter_for(model) -> ModelAdapter:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedModel(f"no adapter for model type {model_type!r}; supported: {', '.join(sorted(ADAPTERS))} "
                               "(add a ModelAdapter entry in utils/models.py)")
    return ADAPTERS[model_type]


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def set_module(root: nn.Module, path: str, module: nn.Module):
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def untie_embeddings(model, adapter: ModelAdapter):
    """Give lm_head its own weight so the table (E bits) and lm_head (W bits) are independent."""
    head, table = get_module(model, adapter.lm_head), get_module(model, adapter.embedding)
    if head.weight is table.weight or head.weight.data_ptr() == table.weight.data_ptr():
        head.weight = nn.Parameter(table.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False


# ----- loading -----
def parse_model_args(model_args: str) -> dict:
    """'pretrained=x,use_accelerate=True,dtype=float16' -> dict (lm-eval's key=value syntax)."""
    args = {}
    for item in filter(None, (s.strip() for s in (model_args or "").split(","))):
        if "=" not in item:
            raise UsageError(f"--model_args item {item!r} is not key=value")
        key, value = item.split("=", 1)
        args[key] = {"true": True, "false": False}.get(value.lower(), value)
    return args


def load_model(name: str, dtype: str = "auto", device: str = "cpu", use_accelerate: bool = False):
    """(model, tokenizer). `name` is a hub id, a local folder, or a name in OFFLINE_MODELS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if name in OFFLINE_MODELS:
        name = offline_model_folder(name)
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    kwargs = {"dtype": torch_dtype}
    if use_accelerate:
        kwargs["device_map"] = "auto"
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except OSError as error:
        raise ModelUnavailable(f"cannot load model {name!r}: {str(error).splitlines()[0]} "
                               f"(offline, use pretrained={OFFLINE_MODEL})") from None
    except pickle.UnpicklingError as error:  # torch.load(weights_only=True) met something other than tensors
        refused = re.search(r"Unsupported global: GLOBAL \S+", str(error))
        raise ModelUnavailable(f"cannot load model {name!r}: torch refuses its pickle weights as unsafe "
                               f"({refused.group(0) if refused else 'not only tensors'}); convert them to "
                               "safetensors with code you trust, or use another model") from None
    if not use_accelerate:
        model.to(device)
    _own_cpu_tensors(model)
    model.eval()
    model.requires_grad_(False)
    model.name_or_path = name
    return model, tokenizer


def _own_cpu_tensors(model):
    """Copy CPU weights out of the checkpoint's memory map. transformers views every tensor into one map of
    the file, which stays resident as long as any tensor views it: weights replaced during quantization
    would otherwise keep their pages in memory (a second copy of the model)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.device.type == "cpu":
            tensor.data = tensor.data.clone()


def offline_model_folder(name: str = OFFLINE_MODEL) -> str:
    """Convert the GGUF of offline model `name` (a key of OFFLINE_MODELS) into a normal HF folder once
    (fp32 dequantized weights) and cache it."""
    asset, folder_name = OFFLINE_MODELS[name]
    folder = cache_dir() / "models" / folder_name
    if (folder / "config.json").exists():
        return str(folder)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = asset_path(asset)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = source.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(source.state_dict())
    model.tie_weights()
    partial = folder.with_name(folder.name + ".part")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    os.replace(partial, folder)
    return str(folder)


def model_fingerprint(model) -> dict:
    """Identity of a model for parameter files: a hash of its parameter shapes plus a content signature
    (mean |value| of the first 4096 entries of each parameter), which tells apart same-shaped checkpoints
    and survives a change of dtype."""
    if any(getattr(m, "released", False) for m in model.modules()):
        raise ValueError("this model's full-precision weights were released by quantize(release_originals=True); "
                         "take its fingerprint before quantizing")
    named = sorted(model.named_parameters(remove_duplicate=False))  # the same before and after untying
    shape_hash = hashlib.sha256(repr([(n, tuple(p.shape)) for n, p in named]).encode()).hexdigest()[:16]
    signature = [float(f"{p.detach().flatten()[:4096].float().abs().mean().item():.4g}") for _, p in named]
    return {"model_type": model.config.model_type, "shapes": shape_hash, "signature": signature}
