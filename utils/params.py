"""Parameter files: the searched quantizers of every wrapped module, as safetensors + JSON metadata.

The metadata carries the model's fingerprint, the config, qbits, search settings and versions, so a
file is refused for another model or another config instead of being loaded silently. Reference `.pt`
files (nbasyl/LLM-FP4 layout, spec 5.4) are read with torch.load(weights_only=True).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from configs import QuantConfig
from quant_layers import FPFormat, FPQuantizer, QuantEmbedding
from quant_layers.quantizers import quantizer_from_state, quantizer_to_state

from .calibrate import quant_modules
from .models import model_fingerprint

FORMAT_VERSION = 1
SLOTS = ("weight_quantizer", "act_quantizer")


class ParamFileError(ValueError):
    pass


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    import transformers
    try:
        lm_eval_version = version("lm_eval")
    except PackageNotFoundError:
        lm_eval_version = None
    return {"torch": torch.__version__, "transformers": transformers.__version__, "lm_eval": lm_eval_version,
            "format": FORMAT_VERSION}


def default_path(root: str | Path, config: QuantConfig, model_name: str, fingerprint: dict, calib: str) -> Path:
    """search_result/<config>/<model>-<fingerprint>/<every setting>.safetensors"""
    s = config.search
    model_dir = model_folder(model_name, fingerprint)
    w, a, e, we, ae, ee = config.qbits
    name = (f"W{w}A{a}E{e}_exp{we}{ae}{ee}_round{s.rounds}_gamma{s.gamma_low:g}-{s.gamma_high:g}-{s.n_candidates}"
            f"_{s.grid}-{s.strategy}_{config.preshift}_{calib}.safetensors")
    return Path(root) / config.name / model_dir / name


def model_folder(model_name: str, fingerprint: dict) -> str:
    """<model>-<shape hash>: one folder per model, so runs of different models never share a file."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", model_name.rstrip("/").split("/")[-1] if "/" in model_name
                  else model_name)[:60]
    return f"{slug}-{fingerprint['shapes'][:8]}"


def save_params(path: str | Path, model, config: QuantConfig, model_name: str, extra: dict | None = None,
                fingerprint: dict | None = None):
    """Write the quantizers of a calibrated model. `fingerprint` is `model_fingerprint` of the model as
    loaded (needed when quantize() released its full-precision weights)."""
    path = Path(path)
    fingerprint = fingerprint or model_fingerprint(model)
    if path.exists():
        try:
            old = read_metadata(path)
        except ParamFileError:
            old = {}
        if "fingerprint" in old and not _same_model(old["fingerprint"], fingerprint):
            raise ParamFileError(f"{path} holds parameters of another model ({old.get('model')}); "
                                 "choose another --ptq_param_path")
    modules, tensors = {}, {}
    for name, module in quant_modules(model).items():
        entry = {"type": type(module).__name__}
        for slot in SLOTS:
            quantizer = getattr(module, slot, None)
            if quantizer is not None:
                spec, values = quantizer_to_state(quantizer)
                entry[slot] = spec
                tensors.update({f"{name}.{slot}.{k}": v.detach().contiguous().cpu() for k, v in values.items()})
        if getattr(module, "input_shift", None) is not None:
            tensors[f"{name}.input_shift"] = module.input_shift.detach().contiguous().cpu()
        modules[name] = entry
    metadata = {"model": model_name, "fingerprint": fingerprint, "config": config.to_dict(),
                "qbits": config.qbits, "versions": versions(), "modules": modules, **(extra or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"llm_fp4": json.dumps(metadata, default=str)})
    return path


def read_metadata(path: str | Path) -> dict:
    try:
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            return json.loads((f.metadata() or {})["llm_fp4"])
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as error:
        raise ParamFileError(f"{path} is not a parameter file of this toolkit ({type(error).__name__}); "
                             "re-run calibration or pass a valid --ptq_param_path") from None


def load_params(path: str | Path, model, config: QuantConfig, check_model: bool = True):
    """Install saved quantizers into a model prepared for `config`; no calibration pass is needed."""
    path = Path(path)
    if not path.exists():
        raise ParamFileError(f"--ptq_param_path {path} does not exist")
    if path.suffix == ".pt":
        return load_reference_pt(path, model, config)
    meta = read_metadata(path)
    if meta["config"]["name"] != config.name or meta["qbits"] != config.qbits:
        raise ParamFileError(f"{path} was made with {meta['config']['name']} --qbits {meta['qbits']}, not "
                             f"{config.name} --qbits {config.qbits}; pass the same --quant_config and --qbits")
    if check_model and not _same_model(meta["fingerprint"], model_fingerprint(model)):
        raise ParamFileError(f"{path} was calibrated for another model ({meta['model']}); "
                             "pass the parameter file of this model")
    try:
        tensors = load_file(str(path))
    except SafetensorError as error:
        raise ParamFileError(f"{path} is corrupt ({error}); re-run calibration") from None
    modules = quant_modules(model)
    if set(modules) != set(meta["modules"]):
        raise ParamFileError(f"{path} does not cover this model's quantized modules; pass the file of this model")
    device = next(model.parameters()).device
    for name, entry in meta["modules"].items():
        module = modules[name]
        for slot in SLOTS:
            if slot in entry:
                prefix = f"{name}.{slot}."
                values = {k[len(prefix):]: v.to(device) for k, v in tensors.items() if k.startswith(prefix)}
                setattr(module, slot, quantizer_from_state(entry[slot], values))
        if f"{name}.input_shift" in tensors:
            module.input_shift = tensors[f"{name}.input_shift"].to(device)
        module.freeze()
    return meta


def _same_model(saved: dict, current: dict) -> bool:
    if saved["model_type"] != current["model_type"] or saved["shapes"] != current["shapes"]:
        return False
    a, b = torch.tensor(saved["signature"]), torch.tensor(current["signature"])
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-2, atol=1e-6)


def load_reference_pt(path: Path, model, config: QuantConfig):
    """Read a parameter file written by the reference code (flat state-dict subset, spec sec. 5.4)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a pickle that weights_only refuses, or a corrupt file
        raise ParamFileError(f"{path} is not a loadable reference parameter file ({type(error).__name__})") from None
    modules = quant_modules(model)
    device = next(model.parameters()).device
    for name, module in modules.items():
        def get(key):
            return state.get(f"{name}.{key}")
        if isinstance(module, QuantEmbedding):
            if get("interval") is None:
                raise ParamFileError(f"{path} has no entry for {name}; is it from another model?")
            fmt = FPFormat(int(get("exponent_bit")), int(get("mantissa_bit")))
            bias = get("interval").float()
            module.weight_quantizer = FPQuantizer(fmt, (bias.reshape(-1, 1) if bias.numel() > 1 else bias.reshape(()))
                                                  .to(device))
        else:
            if get("w_interval") is None:
                raise ParamFileError(f"{path} has no entry for {name}; is it from another model?")
            w_fmt = FPFormat(int(get("w_exponent_bit")), int(get("w_mantissa_bit")))
            a_fmt = FPFormat(int(get("a_exponent_bit")), int(get("a_mantissa_bit")))
            module.weight_quantizer = FPQuantizer(w_fmt, get("w_interval").float().reshape(-1, 1).to(device))
            rho = get("a_interval").float().reshape(())
            if get("a_bias") is not None:  # FPQ: the reference's integer offsets round(b_j) - round(rho)
                zero_point = get("a_interval_zero_point")
                zero_point = torch.round(rho) if zero_point is None else zero_point.float().reshape(())
                shift = (torch.round(get("a_bias").float().reshape(-1)) - zero_point).clamp(0, a_fmt.max_exponent_code)
                bias = rho + shift
            else:
                bias = rho
            module.act_quantizer = FPQuantizer(a_fmt, bias.to(device))
        module.freeze()
    return {"model": "reference .pt", "config": {"name": config.name}}
