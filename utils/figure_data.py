"""The data behind the figures of utils/plots.py, computed from a run and written as `<figure>.json`.

Two short passes over a few calibration windows, neither touching the calibration itself:
- `capture_reference`, on the full-precision model before calibration: each block's inputs, each linear's
  output, the per-channel input and weight magnitudes, and the output of every linear when the block runs with
  MinMax quantizers of the config's formats (FlatQuant: no transforms, no learned clipping);
- `layer_figures`, on the quantized model: each block is fed the full-precision inputs of that block, so an
  error is that of the block's own quantizers, compared with the MinMax block on the same tokens.
The heat map of formats and biases comes from the parameter (or FlatQuant matrix) file alone (`format_map`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from configs import QuantConfig
from quant_layers import FPFormat, QuantLinear, make_quantizer
from quant_layers.learnable import DynamicQuantizer

from .adapters import LLAMA_LIKE, ModelAdapter, adapter_for
from .models import get_module
from .pipeline import capture_block_inputs, run_block

FIGURE_WINDOWS = 2  # calibration windows of the figure passes
FIGURE_SEQLEN = 256  # at most this many tokens per window


@dataclass
class Reference:
    """The full-precision side of the figures, taken before calibration."""
    block_inputs: list  # [windows, T, hidden] per block
    call_kwargs: list  # per block
    outputs: dict  # linear path -> full-precision output [tokens, out]
    input_absmax: dict  # linear path -> max |x_j| per input channel
    weight_absmax: dict  # linear path -> max_i |W_ij| per input channel
    minmax_error: dict  # linear path -> relative MSE of the linear's output in the MinMax-quantized block


def block_linears(model, adapter: ModelAdapter) -> list[list[str]]:
    """Names of the quantized linears of each block, in execution order."""
    count = len(get_module(model, adapter.layers))
    return [[name for group in adapter.linear_groups for name in group] for _ in range(count)]


def relative_mse(output: torch.Tensor, target: torch.Tensor) -> float:
    target = target.float()
    return float((output.float() - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30))


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1, x.shape[-1])


class _Hooks:
    """Forward hooks on named submodules, removed on exit."""

    def __init__(self, root: nn.Module, names, hook_for):
        self.handles = [root.get_submodule(n).register_forward_hook(hook_for(n)) for n in names]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def _block_inputs(model, adapter, samples):
    """Full-precision inputs of every decoder block over `samples`, and each block's call arguments."""
    captured = capture_block_inputs(model, adapter, samples.to(model.device), batch_size=len(samples))
    inputs, hidden = [], captured.hidden
    for block, call_kwargs in zip(get_module(model, adapter.layers), captured.call_kwargs):
        inputs.append(hidden)
        hidden = run_block(block, hidden, call_kwargs, batch_size=len(samples))
    return inputs, captured.call_kwargs


def minmax_quantizers(config: QuantConfig, weight: torch.Tensor, x: torch.Tensor):
    """(weight quantizer, activation quantizer) of the config's formats with ranges from absmax alone;
    None for an operand of 16 bits. FlatQuant's are its per-row and per-token quantizers without clipping."""
    w_quant = a_quant = None
    if config.method == "flatquant":
        def element(kind, bits):
            return FPFormat.from_bits(bits, getattr(config, f"{kind}_exp")) if config.element == "fp" else bits
        if config.w_bits < 16:
            w_quant = DynamicQuantizer(element("w", config.w_bits), not config.flat.w_asym)
        if config.a_bits < 16:
            a_quant = DynamicQuantizer(element("a", config.a_bits), not config.flat.a_asym)
    else:
        w_scheme, a_scheme = config.scheme("weight"), config.scheme("input")
        w_quant = make_quantizer(w_scheme, weight) if w_scheme else None
        a_quant = make_quantizer(a_scheme, x) if a_scheme else None
    return w_quant, a_quant


@torch.no_grad()
def capture_reference(model, config: QuantConfig, samples: torch.Tensor) -> Reference:
    """The full-precision pass (run it before calibration): see the module docstring."""
    adapter = adapter_for(model)
    block_inputs, call_kwargs = _block_inputs(model, adapter, samples)
    blocks = get_module(model, adapter.layers)
    reference = Reference(block_inputs, call_kwargs, {}, {}, {}, {})
    for index, (block, names) in enumerate(zip(blocks, block_linears(model, adapter))):
        prefix = f"{adapter.layers}.{index}"

        def record(name):
            def hook(module, args, out):
                path = f"{prefix}.{name}"
                reference.outputs[path] = _flat(out)
                reference.input_absmax[path] = _flat(args[0]).abs().amax(0).float().cpu()
                reference.weight_absmax[path] = module.weight.detach().abs().amax(0).float().cpu()
            return hook

        def minmax(name):
            def hook(module, args, _out):
                x, weight = args[0], module.weight.detach()
                w_quant, a_quant = minmax_quantizers(config, weight.float(), x)
                if w_quant is not None:
                    weight = w_quant(weight.float()).to(weight.dtype)
                quantized = torch.nn.functional.linear(x if a_quant is None else a_quant(x), weight, module.bias)
                path = f"{prefix}.{name}"
                reference.minmax_error[path] = relative_mse(_flat(quantized), reference.outputs[path])
                return quantized
            return hook
        with _Hooks(block, names, record):
            block(block_inputs[index], **call_kwargs[index])
        with _Hooks(block, names, minmax):
            block(block_inputs[index], **call_kwargs[index])
    return reference


def _changed_basis(config: QuantConfig, adapter: ModelAdapter) -> set:
    """Linears whose output a FlatQuant fold moves to another basis (v_proj's rows carry the value transform,
    a linear that receives a per-channel scale its rows): their output cannot be compared with the original's."""
    if config.method != "flatquant" or not config.flat.transform:
        return set()
    scaled = {group.source for group in adapter.groups if group.fold == "rows"} if config.flat.add_diag else set()
    return ({adapter.value_proj} if adapter.value_proj else set()) | scaled


def quantizer_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the activation quantizer of a QuantLinear sees: the online transform and pre-shift applied. A
    simulated pre-shift (per-channel activation biases) counts as the scaling 2^(b_j - min b) it is equivalent to."""
    if not isinstance(module, QuantLinear):
        return x
    if module.input_transform is not None:
        x = module.input_transform(x)
    if module.input_scale is not None:
        x = x * module.input_scale
    bias = getattr(module.act_quantizer, "bias", None)
    if bias is not None and bias.numel() > 1:
        x = x * torch.exp2(bias - bias.min()).to(x.dtype)
    return x


def applied_weight(module: nn.Module) -> torch.Tensor:
    """The weight a quantized linear multiplies (quantized, shifted, transformed), else its weight."""
    weight = getattr(module, "quantized_weight", None)
    return (module.weight if weight is None else weight).detach()


def method_label(config: QuantConfig) -> str:
    if config.method == "flatquant":
        weights = {"rtn": "RTN", "gptq": "GPTQ", "fpq_search": "FPQ weight search"}[config.flat.weight_quantizer]
        return f"FlatQuant ({'transformed, ' if config.flat.transform else ''}{weights})"
    labels = {"minmax": "MinMax, ranges from every calibration window", "fpq_baseline": "FPQ baseline (searched)", "fpq": "FPQ (searched, pre-shifted)"}
    return labels[config.method]


def chosen_layers(model, adapter: ModelAdapter) -> list[str]:
    """The first linear reading the attention input and the down projection's input, in the first, middle and
    last block."""
    count = len(get_module(model, adapter.layers))
    heads = [adapter.linear_groups[0][0], adapter.linear_groups[-1][0]]
    return [f"{adapter.layers}.{i}.{name}" for i in sorted({0, count // 2, count - 1}) for name in heads]


@torch.no_grad()
def layer_figures(model, config: QuantConfig, reference: Reference) -> dict:
    """Figure payloads channel_ranges, layer_error and flatness from the quantized `model`."""
    adapter = adapter_for(model)
    blocks, skipped = get_module(model, adapter.layers), _changed_basis(config, adapter)
    after_input, after_weight, errors = {}, {}, {}
    chosen = chosen_layers(model, adapter)
    for index, (block, names) in enumerate(zip(blocks, block_linears(model, adapter))):
        prefix = f"{adapter.layers}.{index}"

        def record(name):
            def hook(module, args, out):
                path = f"{prefix}.{name}"
                if path in chosen:
                    after_input[path] = _flat(quantizer_input(module, args[0])).abs().amax(0).float().cpu()
                    after_weight[path] = applied_weight(module).abs().amax(0).float().cpu()
                errors[path] = None if name in skipped else relative_mse(_flat(out), reference.outputs[path])
            return hook
        with _Hooks(block, names, record):
            block(reference.block_inputs[index].to(next(block.parameters()).dtype), **reference.call_kwargs[index])
    tokens = reference.block_inputs[0].shape[0] * reference.block_inputs[0].shape[1]
    common = {"tokens": tokens, "method": method_label(config)}
    ranges = {p: {"before": reference.input_absmax[p].tolist(), "after": after_input[p].tolist()} for p in chosen}
    flatness = {p: {"weight_before": reference.weight_absmax[p].tolist(), "weight_after": after_weight[p].tolist(),
                    **ranges[p]} for p in chosen}
    layer_paths = [f"{adapter.layers}.{i}.{n}" for i, names in enumerate(block_linears(model, adapter)) for n in names]
    return {
        "channel_ranges": {**common, "layers": ranges},
        "layer_error": {**common, "layers": [{"path": p, "minmax": reference.minmax_error[p], "calibrated": errors[p]}
                                             for p in layer_paths],
                        "not_comparable": sorted(skipped)},
        "flatness": {**common, "layers": flatness},
    }


# ----- the heat map, from the parameter file or FlatQuant matrix file alone -----
def _read_file(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    key = "llm_fp4" if "llm_fp4" in meta else "flatquant"
    return {"kind": key, **json.loads(meta[key])}, load_file(str(path))


def _param_cell(spec: dict | None, tensors: dict, prefix: str):
    """(format name, value, value kind) of one quantizer of a parameter file."""
    if spec is None:
        return "16 bit", None, None
    if spec["kind"] == "fp":
        name = f"E{spec['exponent_bits']}M{spec['mantissa_bits']}"
        bias = tensors.get(f"{prefix}.bias")
        return name, None if bias is None else float(bias.float().mean()), "exponent bias"
    scale = tensors.get(f"{prefix}.scale")
    return f"INT{spec['bits']}", None if scale is None else float(scale.float().log2().mean()), "log2 scale"


def _flat_cell(tensors: dict, key: str, element: str):
    clip = tensors.get(f"{key}.max")
    return element, None if clip is None else float(torch.sigmoid(clip.float()).mean()), "clip factor"


def format_map(path: str | Path, adapter: ModelAdapter | None = None) -> dict:
    """Per block and linear: the weight and activation format and its exponent bias (mean over rows), INT
    log2 scale, or FlatQuant's learned clip factor (sigmoid of the clipping parameter, mean over rows)."""
    adapter = adapter or LLAMA_LIKE
    meta, tensors = _read_file(Path(path))
    names = [name for group in adapter.linear_groups for name in group]
    if meta["kind"] == "llm_fp4":
        modules = meta["modules"]
        prefix = adapter.layers + "."
        count = 1 + max(int(p[len(prefix):].split(".")[0]) for p in modules if p.startswith(prefix))

        def cell(block, name, slot):
            path = f"{adapter.layers}.{block}.{name}"
            return _param_cell(modules[path].get(slot), tensors, f"{path}.{slot}")
        slots = {"weight": "weight_quantizer", "activation": "act_quantizer"}
    else:
        count = len(meta["blocks"])
        elements = {k: f"{meta['element'].upper()}{meta[f'{k}_bits']}" for k in ("w", "a")}

        def cell(block, name, slot):
            return _flat_cell(tensors, f"{adapter.layers}.{block}.{name}.{slot}_clip", elements[slot[0]])
        slots = {"weight": "weight", "activation": "act"}
    payload = {"linears": names, "blocks": count, "source": str(path)}
    for side, slot in slots.items():
        cells = [[cell(b, n, slot) for n in names] for b in range(count)]
        kinds = ", ".join(sorted({c[2] for row in cells for c in row if c[2]}))
        payload[side] = {"format": [[c[0] for c in row] for row in cells],
                         "value": [[c[1] for c in row] for row in cells], "value_kind": kinds or None}
    return payload


def run_format_map(result: dict) -> dict | None:
    """format_map of a results.json's parameter or matrix file; None when the run has none (or a reference .pt)."""
    path = result.get("param_path")
    if not path or Path(path).suffix != ".safetensors" or not Path(path).exists():
        return None
    return format_map(path)


def write_figure_data(folder: str | Path, payloads: dict, caption: str):
    """`<figure>.json` for each payload, with the caption every figure carries."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, payload in payloads.items():
        (folder / f"{name}.json").write_text(json.dumps({"figure": name, "caption": caption, **payload}))


def run_caption(result: dict) -> str:
    """model | config | qbits, from a results.json."""
    qbits = result.get("qbits")
    bits = "full precision" if not qbits else "W{} A{} E{} bits, exponent bits {} {} {}".format(*qbits)
    return f"{result['model']} | {result['quant_config']} | {bits}"
