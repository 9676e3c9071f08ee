"""Loading causal LMs (hub, local folder, or an offline GGUF: SmolLM2, Qwen2.5-Coder, Gemma 3), their identity
(fingerprint), and module surgery by path. Model families are described in utils/adapters.py.
"""
from __future__ import annotations

import contextlib
import hashlib
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from .adapters import ModelAdapter, UnsupportedModel, adapter_for  # noqa: F401  (adapter_for and
# UnsupportedModel are part of this module's public loading API)
from .assets import asset_path, cache_dir
from .compressed_tensors_io import load_compressed, quantization_config_of
from .errors import UsageError, UserError
from .files import atomic_write_folder
from .onload import load_offloaded, offload_blocks

OFFLINE_MODEL = "smollm2-135m-offline"  # the default model: the asset `python -m utils.assets` fetches
QWEN_OFFLINE_MODEL = "qwen2.5-coder-0.5b-offline"  # opt-in: `python -m utils.assets qwen2.5-coder-0.5b-gguf`
GEMMA_OFFLINE_MODEL = "gemma3-270m-offline"  # opt-in: `python -m utils.assets gemma3-270m-gguf`
# offline model name -> (GGUF asset in utils/assets.py, folder of the converted model under <cache>/models)
OFFLINE_MODELS = {OFFLINE_MODEL: ("smollm2-gguf", "SmolLM2-135M-Instruct"),
                  QWEN_OFFLINE_MODEL: ("qwen2.5-coder-0.5b-gguf", "Qwen2.5-Coder-0.5B-Instruct"),
                  GEMMA_OFFLINE_MODEL: ("gemma3-270m-gguf", "gemma-3-270m")}


class NonFiniteWeights(UserError, ValueError):
    pass


class ModelUnavailable(UserError, OSError):
    pass


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def set_module(root: nn.Module, path: str, module: nn.Module):
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


@contextlib.contextmanager
def attention_implementation(model, name: str | None):
    """Run the model's attention through transformers' implementation `name` ("eager", "sdpa") for the duration;
    None keeps the model's own. Masks built inside follow it (sdpa passes none for a plain causal window, eager
    a float mask), and the two differ in the last bits of their outputs: calibrating with eager attention, as
    llm-compressor does, gives its static input scales bit for bit."""
    previous = model.config._attn_implementation
    if name is None or name == previous:
        yield
        return
    model.config._attn_implementation = name
    try:
        yield
    finally:
        model.config._attn_implementation = previous


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


def load_model(name: str, dtype: str = "auto", device: str = "cpu", use_accelerate: bool = False,
               offload: str | None = None, offload_folder: str | None = None):
    """(model, tokenizer). `name` is a hub id, a local folder, or a name in OFFLINE_MODELS. A compressed-tensors
    checkpoint (ours or llm-compressor's) loads as the fake-quantized model it describes.

    offload="cpu": the decoder blocks stay on CPU and move to `device` one at a time; offload="disk": they stay in
    the checkpoint's safetensors shards (a local folder) and are read one at a time, calibrated blocks going to
    scratch files in `offload_folder` (a temporary folder when None); see utils/onload.py."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if name in OFFLINE_MODELS:
        name = offline_model_folder(name)
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    kwargs = {"dtype": torch_dtype}
    if use_accelerate:
        kwargs["device_map"] = "auto"
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        if quantization_config_of(name) is not None:  # already quantized: decoded into our fake-quantized modules
            model = load_compressed(name, torch_dtype, device)
        elif offload == "disk":
            model = load_offloaded(name, torch_dtype, device, offload_folder,
                                   check=lambda tensors: check_finite_tensors(tensors, name))
        else:
            model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except OSError as error:
        raise ModelUnavailable(f"cannot load model {name!r}: {str(error).splitlines()[0]} "
                               f"(offline, use pretrained={OFFLINE_MODEL})") from None
    except pickle.UnpicklingError as error:  # torch.load(weights_only=True) met something other than tensors
        refused = re.search(r"Unsupported global: GLOBAL \S+", str(error))
        raise ModelUnavailable(f"cannot load model {name!r}: torch refuses its pickle weights as unsafe "
                               f"({refused.group(0) if refused else 'not only tensors'}); convert them to "
                               "safetensors with code you trust, or use another model") from None
    if use_accelerate:
        refuse_offloaded_placement(model)
    if offload == "cpu":
        offload_blocks(model, device)
    elif not use_accelerate and offload is None:
        model.to(device)
    _own_cpu_tensors(model)
    check_finite_weights(model, name)
    model.eval()
    model.requires_grad_(False)
    model.name_or_path = name
    return model, tokenizer


def refuse_offloaded_placement(model):
    """accelerate's device_map="auto" leaves what the GPUs cannot hold on CPU or disk behind meta tensors, which
    only its forward hooks fill; calibration reads weights outside the forward, so that placement is refused."""
    offloaded = sum(p.numel() for p in model.parameters() if p.device.type == "meta")
    if offloaded:
        total = sum(p.numel() for p in model.parameters())
        raise UsageError(f"accelerate's device_map left {offloaded / total:.0%} of the weights on CPU or disk (the "
                         "GPUs cannot hold the model); drop use_accelerate=True and pass --offload cpu (or --offload "
                         "disk), which calibrates one block at a time")


def check_finite_weights(model, name: str):
    """Refuse a checkpoint holding NaN or infinite weights: calibrated and evaluated, it would only give a
    perplexity of nan. One tensor at a time, so the check needs no second copy of the model."""
    check_finite_tensors(model.named_parameters(), name)


def check_finite_tensors(named_tensors, name: str):
    """check_finite_weights on (name, tensor) pairs; blocks offloaded to disk are checked as they are read."""
    for tensor_name, tensor in named_tensors:
        if tensor.device.type == "meta":  # offloaded: its values are not in memory to check
            continue
        bad = int((~torch.isfinite(tensor.detach())).sum())
        if bad:
            raise NonFiniteWeights(f"model {name}: weight {tensor_name} holds {bad} NaN or infinite values of "
                                   f"{tensor.numel()}; the checkpoint is corrupt, download or convert it again")


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

    def write(temporary: Path):
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
    # each process converts into its own folder; one that another process converted meanwhile is as good
    atomic_write_folder(folder, write, keep_existing=True)
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
    onloader = getattr(model, "onloader", None)  # blocks on disk: their tensors are read from the checkpoint

    def values(name, p):
        if p.device.type == "meta" and onloader is not None:
            return onloader.leading_values(name, 4096)
        return p.detach().flatten()[:4096]
    signature = [float(f"{values(n, p).float().abs().mean().item():.4g}") for n, p in named]
    return {"model_type": model.config.model_type, "shapes": shape_hash, "signature": signature}


def same_model(saved: dict, current: dict) -> bool:
    """Whether two model_fingerprint results name the same model (signatures equal up to dtype rounding)."""
    if saved["model_type"] != current["model_type"] or saved["shapes"] != current["shapes"]:
        return False
    a, b = torch.tensor(saved["signature"]), torch.tensor(current["signature"])
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-2, atol=1e-6)
