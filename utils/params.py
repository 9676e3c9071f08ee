"""Parameter files: the searched quantizers of every wrapped module, as safetensors + JSON metadata.

The metadata carries the model's fingerprint, the config, qbits, search settings and versions, so a
file is refused for another model or another config instead of being loaded silently. Reference `.pt`
files (nbasyl/LLM-FP4 layout, spec 5.4) are read with torch.load(weights_only=True).
"""
from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from configs import QuantConfig
from quant_layers import FPFormat, FPQuantizer, QuantEmbedding
from quant_layers.quantizers import quantizer_from_state, quantizer_to_state

from .pipeline import quant_modules
from .models import model_fingerprint, same_model
from .errors import ParamFileError
from .files import atomic_write
from .param_checks import check_module
from .onload import apply_onloaded, stored_tensor

FORMAT_VERSION = 1
SLOTS = ("weight_quantizer", "act_quantizer")


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
            f"_{s.grid}-{s.strategy}_{config.preshift}{'_refnumerics' if config.fp_numerics == 'reference' else ''}"
            f"{'_fedquantized' if config.feed_quantized else ''}"
            f"{'_attn-' + config.calib_attention if config.calib_attention else ''}_{calib}.safetensors")
    return Path(root) / config.name / model_dir / name


def model_folder(model_name: str, fingerprint: dict) -> str:
    """<model>-<shape hash>: one folder per model, so runs of different models never share a file."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", model_name.rstrip("/").split("/")[-1] if "/" in model_name
                  else model_name)[:60]
    return f"{slug}-{fingerprint['shapes'][:8]}"


def save_params(path: str | Path, model, config: QuantConfig, model_name: str, extra: dict | None = None,
                fingerprint: dict | None = None, partial: dict | None = None, only: set[str] | None = None):
    """Write the quantizers of a calibrated model. `fingerprint` is `model_fingerprint` of the model as
    loaded (needed when quantize() released its full-precision weights). `partial` (e.g. {"blocks_done": 3,
    "blocks": 32}) marks the file of an unfinished calibration: it holds only the modules calibrated so far
    (of those named in `only`, when given), `load_params` refuses it and `--resume` continues it. The file is
    written atomically."""
    path = Path(path)
    fingerprint = fingerprint or model_fingerprint(model)
    check_overwrite(path, fingerprint)
    modules, tensors = {}, {}
    for name, module in quant_modules(model).items():
        if partial is not None and (module.quantized_weight is None or (only is not None and name not in only)):
            continue  # not calibrated yet
        entry = {"type": type(module).__name__}
        for slot in SLOTS:
            quantizer = getattr(module, slot, None)
            if quantizer is not None:
                spec, values = quantizer_to_state(quantizer)
                entry[slot] = spec
                tensors.update({f"{name}.{slot}.{k}": v.detach().contiguous().cpu() for k, v in values.items()})
        if getattr(module, "input_shift", None) is not None:
            tensors[f"{name}.input_shift"] = module.input_shift.detach().contiguous().cpu()
        if module.weight_on_grid:  # GPTQ's weights: not recomputable from W and the ranges, so kept as codes
            codes, _ = module.weight_quantizer.encode(stored_tensor(module, "quantized_weight").float())
            tensors[f"{name}.weight_codes"] = smallest_int(codes).contiguous().cpu()
        modules[name] = entry
    metadata = {"model": model_name, "fingerprint": fingerprint, "config": config.to_dict(),
                "qbits": config.qbits, "versions": versions(), "modules": modules, **(extra or {})}
    if partial is not None:
        metadata["partial"] = partial
    header = {"llm_fp4": json.dumps(metadata, default=str)}
    return atomic_write(path, lambda temporary: save_file(tensors, str(temporary), metadata=header))


def check_overwrite(path: Path, fingerprint: dict):
    """Never overwrite the parameter file of another model (checked before calibrating, and when saving)."""
    if path.exists():
        try:
            old = read_metadata(path)
        except ParamFileError:
            old = {}
        if "fingerprint" in old and not same_model(old["fingerprint"], fingerprint):
            raise ParamFileError(f"{path} holds parameters of another model ({old.get('model')}); "
                                 "choose another --ptq_param_path")


def read_metadata(path: str | Path) -> dict:
    try:
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            return json.loads((f.metadata() or {})["llm_fp4"])
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as error:
        raise ParamFileError(f"{path} is not a parameter file of this toolkit ({type(error).__name__}); "
                             "re-run calibration or pass a valid --ptq_param_path") from None


def load_params(path: str | Path, model, config: QuantConfig, check_model: bool = True, partial_ok: bool = False,
                fingerprint: dict | None = None):
    """Install saved quantizers into a model prepared for `config`; no calibration pass is needed. Every
    quantizer is checked against the model and config first (utils/param_checks.py). The file of an
    unfinished calibration is refused unless `partial_ok` (then its modules are installed, the rest left).
    `fingerprint`: the model's as loaded, when a method has already changed its weights (a rotation)."""
    path = Path(path)
    if not path.exists():
        raise ParamFileError(f"--ptq_param_path {path} does not exist")
    if path.suffix == ".pt":
        return load_reference_pt(path, model, config)
    meta = read_metadata(path)
    if "partial" in meta and not partial_ok:
        done = meta["partial"]
        raise ParamFileError(f"{path} is an unfinished calibration ({done.get('blocks_done')} of "
                             f"{done.get('blocks')} blocks); finish it with --resume")
    if meta["config"]["name"] != config.name or meta["qbits"] != config.qbits:
        raise ParamFileError(f"{path} was made with {meta['config']['name']} --qbits {meta['qbits']}, not "
                             f"{config.name} --qbits {config.qbits}; pass the same --quant_config and --qbits")
    if check_model and not same_model(meta["fingerprint"], fingerprint or model_fingerprint(model)):
        raise ParamFileError(f"{path} was calibrated for another model ({meta['model']}); "
                             "pass the parameter file of this model")
    try:
        tensors = load_file(str(path))
    except SafetensorError as error:
        raise ParamFileError(f"{path} is corrupt ({error}); re-run calibration") from None
    modules = quant_modules(model)
    covered = set(meta["modules"]) <= set(modules) if "partial" in meta else set(meta["modules"]) == set(modules)
    if not covered:
        raise ParamFileError(f"{path} does not cover this model's quantized modules; pass the file of this model")
    for name, entry in meta["modules"].items():
        check_module(path, name, entry, modules[name], tensors, config)
    device = next(model.parameters()).device

    def install(name):
        entry, module = meta["modules"][name], modules[name]
        for slot in SLOTS:
            if slot in entry:
                prefix = f"{name}.{slot}."
                values = {k[len(prefix):]: v.to(device) for k, v in tensors.items() if k.startswith(prefix)}
                setattr(module, slot, quantizer_from_state(entry[slot], values))
        if f"{name}.input_shift" in tensors:
            module.input_shift = tensors[f"{name}.input_shift"].to(device)
        codes = tensors.get(f"{name}.weight_codes")
        if codes is not None:
            prefix = f"{name}.weight_quantizer."
            ranges = {k[len(prefix):]: v.to(device) for k, v in tensors.items() if k.startswith(prefix)}
            module.weight.data.copy_(module.weight_quantizer.decode(codes.to(device, torch.int32), ranges))
        module.freeze(on_grid=codes is not None)
    apply_onloaded(model, list(meta["modules"]), install)
    return meta


def smallest_int(codes: torch.Tensor) -> torch.Tensor:
    """Integer codes in the narrowest integer dtype that holds them (uint8 for every 4- to 8-bit code)."""
    for dtype in (torch.uint8, torch.int8, torch.int16):
        info = torch.iinfo(dtype)
        if codes.numel() == 0 or (info.min <= codes.min() and codes.max() <= info.max):
            return codes.to(dtype)
    return codes.to(torch.int32)


REFERENCE_CONFIGS = {"minmax": "MinMax_config_llama", "fpq_baseline": "FPQ_baseline_config_llama",
                     "fpq": "FPQ_config_llama"}
OPERAND_KEYS = {"w": ("w_exponent_bit", "w_mantissa_bit"), "a": ("a_exponent_bit", "a_mantissa_bit"),
                "e": ("exponent_bit", "mantissa_bit")}


def read_reference_pt(path: str | Path) -> dict:
    """The tensors of a reference parameter file (never unpickling anything but tensors)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a pickle that weights_only refuses, or a corrupt file
        raise ParamFileError(f"{path} is not a loadable reference parameter file ({type(error).__name__})") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ParamFileError(f"{path} is not a reference parameter file (not a dict of tensors)")
    return state


def reference_methods(state: dict) -> tuple[str, ...]:
    """Which reference configs may have written the file: FPQ saves per-channel `a_bias`; MinMax a scalar
    table bias, the FPQ baseline per-row ones (without a table the two cannot be told apart)."""
    if any(key.endswith(".a_bias") for key in state):
        return ("fpq",)
    tables = [v for key, v in state.items() if key.endswith(".interval")]
    if not tables:
        return ("minmax", "fpq_baseline")
    return ("minmax",) if all(t.numel() == 1 for t in tables) else ("fpq_baseline",)


def reference_formats(state: dict) -> dict:
    """{(module, operand "w"/"a"/"e"): (exponent bits, mantissa bits)} as the file stores them."""
    formats = {}
    for key in state:
        module, _, leaf = key.rpartition(".")
        for operand, (e_key, m_key) in OPERAND_KEYS.items():
            if leaf == e_key and f"{module}.{m_key}" in state:
                formats[module, operand] = (int(state[key]), int(state[f"{module}.{m_key}"]))
    return formats


def check_reference_file(path, state: dict, config: QuantConfig):
    """Refuse a reference file written under another config or other bit widths than `config`'s."""
    for key, value in state.items():
        if key.endswith("_bit") and (value.numel() != 1 or value.is_floating_point() and value != value.round()):
            raise ParamFileError(f"{path}: {key} is not one whole number of bits; pass a parameter file written by "
                                 "the reference code")
    methods, formats = reference_methods(state), reference_formats(state)
    bits = {operand: sorted({1 + e + m for (_, op), (e, m) in formats.items() if op == operand}) for operand in "wae"}
    exponents = {operand: sorted({e for (_, op), (e, _) in formats.items() if op == operand}) for operand in "wae"}
    held = "W{}A{}E{}".format(*("/".join(map(str, bits[op])) or "-" for op in "wae"))
    if config.method not in methods or config.element != "fp":
        names = " or ".join(REFERENCE_CONFIGS[m] for m in methods)
        raise ParamFileError(f"{path} holds the reference's {names} parameters ({held}), not {config.name}'s; "
                             f"pass --quant_config {names}")
    wanted = {"w": config.w_bits, "a": config.a_bits, "e": config.e_bits}
    if any(bits[op] != [wanted[op]] for op in "wae"):
        raise ParamFileError(f"{path} holds {held} parameters, not W{config.w_bits}A{config.a_bits}E{config.e_bits}; "
                             "pass the --qbits it was calibrated with")
    if config.method == "minmax":
        exp_wanted = {"w": config.w_exp, "a": config.a_exp, "e": config.e_exp}
        if any(exponents[op] != [exp_wanted[op]] for op in "wae"):
            held_exp = " ".join("/".join(map(str, exponents[op])) for op in "wae")
            raise ParamFileError(f"{path} holds MinMax formats with exponent bits {held_exp} (W A E), not "
                                 f"{config.w_exp} {config.a_exp} {config.e_exp}; pass those in --qbits")


def config_for_reference_file(path, config: QuantConfig, numerics: str | None = "reference") -> QuantConfig:
    """`config` as the reference code evaluates a file of its own: FP formats with its numerics (its files
    were searched under them) and, for FPQ, the simulated pre-shift it implements. `numerics=None` keeps
    the config's numerics. Refuses a file of another config or other bit widths."""
    check_reference_file(path, read_reference_pt(path), config)
    changes = {"fp_numerics": numerics or config.fp_numerics}
    if config.method == "fpq":
        changes["preshift"] = "simulated"
    return replace(config, **changes)


def load_reference_pt(path: Path, model, config: QuantConfig):
    """Read a parameter file written by the reference code (flat state-dict subset, spec sec. 5.4) into
    quantizers with `config.fp_numerics` (see config_for_reference_file for the reference's own)."""
    state = read_reference_pt(path)
    check_reference_file(path, state, config)
    device = next(model.parameters()).device

    def get(name, key, rows=None):
        value = state.get(f"{name}.{key}")
        if value is None:
            raise ParamFileError(f"{path} has no entry {name}.{key}; is it from another model?")
        if not key.endswith("_bit") and not value.is_floating_point():
            raise ParamFileError(f"{path}: {name}.{key} has dtype {value.dtype}, not a floating-point type; "
                                 "pass a parameter file written by the reference code")
        value = value.float()
        if rows is not None and value.numel() not in rows:
            raise ParamFileError(f"{path}: {name}.{key} has {value.numel()} values where this model needs "
                                 f"{' or '.join(map(str, rows))}; pass the file of this model")
        if not torch.isfinite(value).all():
            raise ParamFileError(f"{path}: {name}.{key} holds non-finite values; re-run the calibration")
        return value.to(device)

    def fmt(name, operand):
        e_key, m_key = OPERAND_KEYS[operand]
        return FPFormat(int(get(name, e_key, (1,))), int(get(name, m_key, (1,))), config.fp_numerics)

    modules = quant_modules(model)

    def install(name):
        module = modules[name]
        if isinstance(module, QuantEmbedding):
            bias = get(name, "interval", (1, module.num_embeddings))
            module.weight_quantizer = FPQuantizer(fmt(name, "e"), bias.reshape(-1, 1) if bias.numel() > 1
                                                  else bias.reshape(()))
        else:
            module.weight_quantizer = FPQuantizer(fmt(name, "w"), get(name, "w_interval", (module.out_features,))
                                                  .reshape(-1, 1))
            module.act_quantizer = FPQuantizer(fmt(name, "a"), reference_act_bias(state, name, get, fmt(name, "a"),
                                                                                module.in_features))
        module.freeze()
    apply_onloaded(model, list(modules), install)
    return {"model": "reference .pt", "config": {"name": config.name}}


def reference_act_bias(state, name, get, a_fmt: FPFormat, in_features: int) -> torch.Tensor:
    """The activation bias the reference computes: rho, or with FPQ's per-channel b_j the effective
    clamp(round(b_j), round(rho), round(rho) + 2^E - 1) - zero_point + rho (zero_point = round(rho) as saved)."""
    rho = get(name, "a_interval", (1,)).reshape(())
    if f"{name}.a_bias" not in state:
        return rho
    zero_point = get(name, "a_interval_zero_point", (1,)).reshape(()) if f"{name}.a_interval_zero_point" in state \
        else torch.round(rho)
    channel_bias = get(name, "a_bias", (in_features,)).reshape(-1)
    low = torch.round(rho)
    return torch.clamp(torch.round(channel_bias), low, low + a_fmt.max_exponent_code) - zero_point + rho
