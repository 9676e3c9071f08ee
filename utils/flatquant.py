"""FlatQuant calibration (spec A.5-A.6), block by block on the pipeline of utils/pipeline.py:

1. run the block in full precision (its outputs are the targets; per-channel input maxima seed the scales);
2. put trainable `FlatLinear`s and a `KVQuant` in it and train transforms, scales and clipping with AdamW
   against the full-precision outputs (loss normalised by its own value, cosine schedule);
3. fold everything into the weights in float64: the block then holds `QuantLinear`s with only the online
   part of each transform, and the attention quantizes Q/K/V through a registered attention function;
4. quantize the weights group by group (RTN, GPTQ or LLM-FP4's search) on the quantized model's own inputs.

The trained matrices of every finished block are written at once, so `--resume` continues an interrupted
run and `--reload_matrix` skips training. This file knows module names (from the adapter), not numerics.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from configs import QuantConfig
from quant_layers import FPFormat, LinearSearch, QuantLinear, make_quantizer
from quant_layers.flat import FlatLinear, KVQuant
from quant_layers.gptq import HessianAccumulator, HessianNotPositiveDefinite, gptq_quantize, rtn_quantize
from quant_layers.learnable import DynamicQuantizer, LearnableBlockQuantizer, WeightClip
from quant_layers.transforms import FixedFactor, KroneckerTransform, freeze_factor, kronecker_factors, make_factor

from . import distributed
from .adapters import Dims, ModelAdapter, adapter_for, fold_scale_into_norm, model_dims
from .models import get_module, same_model, set_module
from .onload import moved, onloader_of
from .block_formats import BlockFormatStep, check_block_sizes
from .pipeline import (CalibrationReport, PeakMemory, capture_block_inputs, record_inputs,
                       run_block, set_quantized)
from .errors import UsageError, UserError
from .files import atomic_write

MATRIX_FORMAT = 1


class MatrixFileError(UserError, ValueError):
    pass


# ----- Q/K/V quantization inside transformers' attention, without copying its forward -----
def enable_kv_quant(model, adapter: ModelAdapter):
    """Route the model's attention through a registered function that applies each attention module's
    `kv_quant` (if it has one) to the post-RoPE queries/keys and the values, then calls the original
    implementation (sdpa or eager) with the original masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    config = model.config
    base = config._attn_implementation or "eager"
    if base.startswith("kvquant_"):
        return
    if base == "eager":
        import sys
        attention_module = get_module(model, adapter.layers)[0].get_submodule(adapter.attention)
        original = sys.modules[type(attention_module).__module__].eager_attention_forward
    else:
        original = ALL_ATTENTION_FUNCTIONS[base]

    def attention(module, query, key, value, attention_mask, **kwargs):
        kv = getattr(module, "kv_quant", None)
        if kv is not None:
            query, key, value = kv(query, key, value)
        return original(module, query, key, value, attention_mask, **kwargs)

    name = f"kvquant_{base}"
    AttentionInterface.register(name, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    config._attn_implementation = name


# ----- the trainable block -----
class FlatBlock(nn.Module):
    """The trainable FlatQuant pieces of one decoder block, keyed by the adapter's module names."""

    def __init__(self, block, adapter: ModelAdapter, config: QuantConfig, dims: Dims, generator: torch.Generator):
        super().__init__()
        flat, self.adapter = config.flat, adapter
        transformed = flat.transform and (config.w_bits < 16 or config.a_bits < 16)
        self.transforms, self.act_quantizers, self.linears = nn.ModuleList(), nn.ModuleList(), nn.ModuleDict()
        self.value_factor = make_factor(dims.head_dim, flat.direct_inv, generator) if transformed else None
        for group in adapter.groups:
            head = block.get_submodule(group.linears[0])
            transform = None
            if transformed and group.fold == "heads":  # o_proj: heads x head_dim
                transform = KroneckerTransform(make_factor(dims.heads, flat.direct_inv, generator), self.value_factor,
                                               head.in_features, right_online=False)
            elif transformed:
                n1, n2 = kronecker_factors(head.in_features)
                transform = KroneckerTransform(make_factor(n1, flat.direct_inv, generator),
                                               make_factor(n2, flat.direct_inv, generator), head.in_features,
                                               diag=flat.add_diag)
            act = _act_quantizer(config)
            self.transforms.append(transform)
            self.act_quantizers.append(act)
            for name in group.linears:
                linear = block.get_submodule(name)
                weight_quantizer, weight_clip = _weight_quantizer(config, linear.out_features)
                self.linears[_key(name)] = FlatLinear(
                    linear, transform, act, weight_quantizer=weight_quantizer, weight_clip=weight_clip,
                    out_factor=self.value_factor if name == adapter.value_proj else None)
        self.kv = self._kv_quant(config, dims, generator)

    @staticmethod
    def _kv_quant(config, dims, generator):
        flat = config.flat
        if min(flat.q_bits, flat.k_bits, flat.v_bits) >= 16:
            return None

        def quantizer(bits, asym, groupsize):
            if bits >= 16:
                return None
            if groupsize > 0 and dims.head_dim % groupsize:
                raise UsageError(f"KV group size {groupsize} does not divide head_dim {dims.head_dim}; "
                                 "pass a divisor of head_dim or -1 (one group per head)")
            return DynamicQuantizer(_element(config, "a", bits), not asym, groupsize,
                                    clip="scalar" if flat.lac else None)
        keys_quantized = flat.transform and min(flat.q_bits, flat.k_bits) < 16
        key_factor = make_factor(dims.head_dim, flat.direct_inv, generator) if keys_quantized else None
        return KVQuant(key_factor, quantizer(flat.q_bits, flat.q_asym, flat.q_groupsize),
                       quantizer(flat.k_bits, flat.k_asym, flat.k_groupsize),
                       quantizer(flat.v_bits, flat.v_asym, flat.v_groupsize))

    def install(self, block):
        for key, linear in self.linears.items():
            set_module(block, _name(key), linear)
        if self.kv is not None:
            block.get_submodule(self.adapter.attention).kv_quant = self.kv

    def init_diag(self, input_absmax: list, alpha: float):
        """SmoothQuant-style s_j = max|W_:,j|^(1-alpha) / max|X_j|^alpha over the group's consumers."""
        for group, transform, x_max in zip(self.adapter.linear_groups, self.transforms, input_absmax):
            if transform is None or transform.diag_scale is None:
                continue
            w_max = torch.cat([self.linears[_key(n)].weight.detach().abs() for n in group]).amax(0).float()
            scale = w_max.pow(1 - alpha) / x_max.float().clamp_min(1e-5).pow(alpha)
            transform.diag_scale.data = scale.clamp_min(1e-5).to(transform.diag_scale)

    def param_groups(self, flat) -> list[dict]:
        factors, diags, clips = [], [], []
        for name, param in self.named_parameters():
            if ".left." in name or ".right." in name or name.startswith("value_factor") or name.startswith("kv.key_factor"):
                factors.append(param)
            elif name.endswith("diag_scale"):
                diags.append(param)
            elif "clip_" in name:
                is_weight = "weight_clip" in name or "weight_quantizer" in name
                if (is_weight and flat.lwc) or (not is_weight and flat.lac):
                    clips.append(param)
        groups = [(factors, flat.cali_trans, flat.flat_lr), (diags, flat.add_diag, flat.flat_lr),
                  (clips, True, 10 * flat.flat_lr)]
        return [{"params": list({id(p): p for p in ps}.values()), "lr": lr} for ps, on, lr in groups if on and ps]

    # ----- explicit matrices (save / reload / resume) -----
    def matrices(self, prefix: str) -> dict:
        """Every trained quantity as explicit tensors keyed by module path (parameterisation-free)."""
        out = {}
        for group, transform, act in zip(self.adapter.linear_groups, self.transforms, self.act_quantizers):
            for name in group:
                path = f"{prefix}.{name}"
                if transform is not None:
                    for side in ("left", "right"):
                        factor = getattr(transform, side)
                        out[f"{path}.transform.{side}"] = factor.matrix().detach()
                        out[f"{path}.transform.{side}_inv_t"] = factor.inverse_t().detach()
                    if transform.diag_scale is not None:
                        out[f"{path}.transform.diag"] = transform.diag_scale.detach()
                if act is not None:
                    out.update(_clip_params(act, f"{path}.act_clip"))
                clip = _weight_clip_of(self.linears[_key(name)])
                if clip is not None:
                    out.update(_clip_params(clip, f"{path}.weight_clip"))
        if self.kv is not None:
            path = f"{prefix}.{self.adapter.attention}.kv_quant"
            if self.kv.key_factor is not None:
                out[f"{path}.key"] = self.kv.key_factor.matrix().detach()
                out[f"{path}.key_inv_t"] = self.kv.key_factor.inverse_t().detach()
            for kind in ("q", "k", "v"):
                quantizer = getattr(self.kv, f"{kind}_quantizer")
                if quantizer is not None:
                    out.update(_clip_params(quantizer, f"{path}.{kind}_clip"))
        return {k: v.float().contiguous().clone() for k, v in out.items()}

    def load_matrices(self, prefix: str, tensors: dict):
        """Freeze every trainable quantity to the saved explicit values."""
        def take(key):
            if key not in tensors:
                raise MatrixFileError(f"the matrix file has no {key}; it was made with other settings or another model")
            return tensors[key]
        loaded = {}  # id(trainable factor) -> its saved matrix, so shared factors stay shared
        with torch.no_grad():
            for group, transform, act in zip(self.adapter.linear_groups, self.transforms, self.act_quantizers):
                path = f"{prefix}.{group[0]}"
                if transform is not None:
                    for side in ("left", "right"):
                        matrix = take(f"{path}.transform.{side}")
                        if matrix.shape != getattr(transform, side).matrix().shape:
                            raise MatrixFileError(f"{path}.transform.{side} has shape {tuple(matrix.shape)}; "
                                                  "the matrix file is from another model")
                        loaded[id(getattr(transform, side))] = FixedFactor(matrix)
                    if transform.diag_scale is not None:
                        transform.diag_scale.copy_(take(f"{path}.transform.diag"))
                if act is not None:
                    _set_clip(act, path + ".act_clip", take)
                for name in group:
                    clip = _weight_clip_of(self.linears[_key(name)])
                    if clip is not None:
                        _set_clip(clip, f"{prefix}.{name}.weight_clip", take)
            if self.kv is not None:
                path = f"{prefix}.{self.adapter.attention}.kv_quant"
                if self.kv.key_factor is not None:
                    loaded[id(self.kv.key_factor)] = FixedFactor(take(f"{path}.key"))
                for kind in ("q", "k", "v"):
                    quantizer = getattr(self.kv, f"{kind}_quantizer")
                    if quantizer is not None:
                        _set_clip(quantizer, f"{path}.{kind}_clip", take)
        self._replace_factors(lambda factor: loaded[id(factor)])

    def _replace_factors(self, new_factor):
        """Swap every factor for new_factor(factor), once per factor object (o_proj and v_proj share one)."""
        done = {}

        def swap(factor):
            return done.setdefault(id(factor), new_factor(factor))
        for transform in self.transforms:
            if transform is not None:
                transform.left, transform.right = swap(transform.left), swap(transform.right)
        for linear in self.linears.values():
            if linear.out_factor is not None:
                linear.out_factor = swap(linear.out_factor)
        if self.value_factor is not None:
            self.value_factor = swap(self.value_factor)
        if self.kv is not None and self.kv.key_factor is not None:
            self.kv.key_factor = swap(self.kv.key_factor)

    def weight_clip_factors(self) -> dict:
        """{module name: per-row clip factor [rows, 1]} of block-format weights with learned clipping: the deployed
        block scales take them (the INT path folds its clip into the weight instead)."""
        return {_name(key): linear.weight_quantizer.clip_factor().detach() for key, linear in self.linears.items()
                if isinstance(linear.weight_quantizer, LearnableBlockQuantizer) and linear.weight_quantizer.clip_max is not None}

    # ----- reparameterisation -----
    def fold_into(self, block):
        """Replace the block's FlatLinears by QuantLinears holding the folded weights (computed in float64);
        per-channel scales go into the producing norm or linear; the attention keeps a frozen KVQuant."""
        self._replace_factors(freeze_factor)  # the float32 matrices applied online, with float64 inverses
        folded = {key: linear.folded() for key, linear in self.linears.items()}
        for group, transform in zip(self.adapter.groups, self.transforms):
            if transform is None or transform.diag_scale is None:
                continue
            scale = transform.diag_scale.detach().double()
            if group.fold == "rows":  # a linear's output rows (up_proj feeding down_proj)
                w, b = folded[_key(group.source)]
                folded[_key(group.source)] = (w * scale[:, None], None if b is None else b * scale)
            else:
                fold_scale_into_norm(block.get_submodule(group.source), scale, self.adapter.norm)
        for group, transform, act in zip(self.adapter.linear_groups, self.transforms, self.act_quantizers):
            online = None if transform is None else transform.frozen()
            for name in group:
                original = self.linears[_key(name)]
                w, b = folded[_key(name)]
                module = QuantLinear(_linear(w.to(original.weight.dtype), None if b is None else b.to(original.weight.dtype)))
                module.input_transform = online
                module.act_quantizer = None if act is None else act.requires_grad_(False)
                module.freeze()  # no weight quantizer yet: activations quantized, weights as folded
                set_module(block, name, module)
        if self.kv is not None:
            block.get_submodule(self.adapter.attention).kv_quant = self.kv.frozen()


def _clip_params(module, path) -> dict:
    """The clipping parameters (clip ratio = sigmoid(parameter)) of a quantizer or weight clip, if learnable."""
    return {f"{path}.{k}": getattr(module, f"clip_{k}").detach() for k in ("max", "min")
            if getattr(module, f"clip_{k}", None) is not None}


def _set_clip(module, path, take):
    for k in ("max", "min"):
        if getattr(module, f"clip_{k}", None) is not None:
            getattr(module, f"clip_{k}").copy_(take(f"{path}.{k}"))


def _weight_clip_of(linear: FlatLinear):
    """The module holding a FlatLinear's learned weight clipping: its WeightClip (INT, FP) or its block quantizer."""
    if linear.weight_clip is not None:
        return linear.weight_clip
    return linear.weight_quantizer if isinstance(linear.weight_quantizer, LearnableBlockQuantizer) else None


def _act_quantizer(config):
    """The training-time input quantizer of a linear group: the named format's dynamic blocks, else per token."""
    flat, clip = config.flat, "scalar" if config.flat.lac else None
    if config.block is not None:
        scheme = config.scheme("input")
        # each data-parallel rank holds a share of the batch whose maximum sets the NVFP4 tensor scale
        return None if scheme is None else LearnableBlockQuantizer(scheme, clip, distributed.maximum)
    return DynamicQuantizer(_element(config, "a", config.a_bits), not flat.a_asym, clip=clip) if config.a_bits < 16 else None


def _weight_quantizer(config, rows: int):
    """(training-time weight quantizer, WeightClip or None): block formats clip their block maxima per row inside
    the quantizer; INT and FP rows are clamped by a WeightClip before a per-row quantizer."""
    flat = config.flat
    if config.block is not None:
        return LearnableBlockQuantizer(config.scheme("weight"), rows if flat.lwc else None), None
    if config.w_bits >= 16:
        return None, None
    return (DynamicQuantizer(_element(config, "w", config.w_bits), not flat.w_asym),
            WeightClip(rows) if flat.lwc else None)


def _element(config, kind, bits):
    return FPFormat.from_bits(bits, getattr(config, f"{kind}_exp")) if config.element == "fp" and bits < 16 else bits


def _key(name: str) -> str:
    return name.replace(".", "__")


def _name(key: str) -> str:
    return key.replace("__", ".")


def _linear(weight, bias) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


# ----- training -----
def _group_input_absmax(block, adapter, hidden, call_kwargs):
    """Full-precision block outputs and the per-channel |x| maximum of each linear group's input (over every
    data-parallel rank's windows)."""
    heads = [group[0] for group in adapter.linear_groups]
    maxima = dict.fromkeys(heads)

    def record(name, x):
        a = x.abs().reshape(-1, x.shape[-1]).amax(0)
        maxima[name] = a if maxima[name] is None else torch.maximum(maxima[name], a)
    out = record_inputs(block, heads, hidden, call_kwargs, record)
    return out, [distributed.maximum(maxima[name]) for name in heads]


def train_block(flat_block: FlatBlock, block, flat, hidden, targets, call_kwargs) -> list[float]:
    """AdamW over the block's trainable pieces; returns the mean loss per epoch.

    Data-parallel: each rank's i-th batch is its share of the single-process i-th batch (windows are dealt
    round-robin); the loss is normalised by the whole batch's and the gradients are summed over the ranks, so
    every rank takes the single-process step."""
    groups = flat_block.param_groups(flat)
    if not groups or flat.epochs == 0:
        return []
    for group in groups:
        for p in group["params"]:
            p.requires_grad_(True)
    optimizer = torch.optim.AdamW(groups)  # torch's default weight decay 0.01 applies, as in the reference
    batch = distributed.local_batch(flat.cali_bsz)
    steps = flat.epochs * math.ceil(hidden.shape[0] / batch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=flat.flat_lr * 1e-3)
    if flat.warmup:
        warm = torch.optim.lr_scheduler.LinearLR(optimizer, 0.01, 1.0, total_iters=16)
        schedule = torch.optim.lr_scheduler.SequentialLR(optimizer, [warm, schedule], milestones=[16])
    history = []
    with torch.enable_grad():
        for _ in range(flat.epochs):
            total = 0.0
            for start in range(0, hidden.shape[0], batch):
                out = run_block(block, hidden[start:start + batch], call_kwargs, batch)
                loss = F.mse_loss(out.float(), targets[start:start + batch].float())
                # unit-scale gradient: one lr fits every layer (spec A.5); the ranks' equal shares of the batch
                # make the sum of their mean errors W times the batch's
                (loss / distributed.reduce(loss.detach())).backward()
                distributed.sum_gradients(flat_block.parameters())
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
                total += loss.item() * out.shape[0]
            history.append(distributed.total(total) / (hidden.shape[0] * distributed.world_size()))
    for p in flat_block.parameters():
        p.requires_grad_(False)
    return history


# ----- weight quantization after folding -----
def _weight_maker(config):
    scheme = config.scheme("weight")
    return lambda w: make_quantizer(scheme, w)


def quantize_block_weights(block, adapter, config, hidden, call_kwargs) -> dict:
    """Quantize each linear group in execution order, on inputs produced with the earlier groups already
    quantized (GPTQ's sequential order); returns {name: loss}. RTN and GPTQ stream the inputs into one
    Hessian per group (in^2 floats, not tokens x in); only the FPQ search keeps the inputs themselves."""
    losses = {}
    for group in adapter.linear_groups:
        modules = [block.get_submodule(n) for n in group]
        head, keep = modules[0], config.flat.weight_quantizer == "fpq_search"
        hessian, captured = HessianAccumulator(head.in_features, hidden.device), []

        def record(_name, x):
            x = x.reshape(-1, x.shape[-1])
            x = x if head.input_transform is None else head.input_transform(x)
            hessian.add(x if head.act_quantizer is None else head.act_quantizer(x))
            if keep:
                captured.append(x)
        record_inputs(block, group[:1], hidden, call_kwargs, record)
        reduce_hessian(hessian)
        inputs, shared = (torch.cat(captured) if keep else None), {}
        split = distributed.token_split(inputs.shape[0], hidden.shape[1]) if keep else None
        for name, module in zip(group, modules):
            losses[name] = _quantize_weight(module, hessian, inputs, config, shared, split)
        captured.clear()  # free the group's inputs before the next group's pass
        del inputs
    return losses


def reduce_hessian(hessian: HessianAccumulator):
    """The accumulator's mean Hessian over every data-parallel rank's tokens (each rank holds its own tokens' mean)."""
    tokens = distributed.total(hessian.tokens)
    if tokens != hessian.tokens:
        hessian.hessian.copy_(distributed.reduce(hessian.hessian * (hessian.tokens / tokens)))
        hessian.tokens = tokens


def quantize_format_weights(block, adapter, config, hidden, call_kwargs, clips: dict) -> dict:
    """A named format's weights and inputs, group by group in execution order: the block-format step's RTN, GPTQ
    or clip search on the folded weights (starting from the learned per-row clips), its dynamic input quantizer
    with NVFP4's tensor scale calibrated on the transformed inputs, fused groups sharing tensor scales."""
    step, report = BlockFormatStep(config, hidden.shape[1]), {}
    for group in adapter.linear_groups:
        inputs = step.group_inputs(block.get_submodule(group[0]))
        record_inputs(block, group[:1], hidden, call_kwargs, lambda _name, x: inputs.add(x))
        modules = {name: block.get_submodule(name) for name in group}
        report.update(step.calibrate_group(modules, inputs, clips))
    return report


def _quantize_weight(module: QuantLinear, hessian: HessianAccumulator, inputs, config, shared, split) -> float:
    """Quantize one folded weight; the loss is the output error the weight quantization adds on the quantized
    inputs, ||Xq (W - Q)^T||^2 = N/2 tr((W - Q) H (W - Q)^T), comparable across RTN, GPTQ and the search."""
    flat, weight = config.flat, module.weight.detach().float()
    if flat.weight_quantizer == "fpq_search":
        search = LinearSearch(weight, inputs, config.search, per_channel=False, shared=shared,
                              input_quantizer=module.act_quantizer, split=split)
        w_state, a_state, _ = search.run(FPFormat.from_bits(config.w_bits, config.w_exp), None)
        module.weight_quantizer = search.weight_quantizer(w_state, a_state)
        del search
        module.freeze()
        quantized = module.quantized_weight.float()
    else:
        make = _weight_maker(config)
        if flat.weight_quantizer == "gptq":
            try:
                result = gptq_quantize(weight, hessian.hessian, make, percdamp=flat.percdamp,
                                       act_order=flat.act_order, groupsize=flat.w_groupsize)
            except HessianNotPositiveDefinite as error:  # the user's settings or data, not a bug
                raise UserError(str(error)) from None
        else:
            result = rtn_quantize(weight, make, groupsize=flat.w_groupsize)
        quantized = result.weight.float()
        module.weight.data = result.weight.to(module.weight.dtype)
        module.weight_quantizer = result.weight_quantizer()  # the ranges GPTQ / RTN chose, for export
        module.freeze(on_grid=True)
    delta = weight - quantized
    return float(hessian.tokens / 2 * ((delta @ hessian.hessian) * delta).sum())


# ----- the driver -----
def default_matrix_path(root, config: QuantConfig, model_name: str, fingerprint: dict, calib: str):
    """search_result/<config>/<model>-<fingerprint>/<every setting>.safetensors"""
    from pathlib import Path
    from .params import model_folder
    f = config.flat
    switches = "".join(k for k, on in (("T", f.transform and f.cali_trans), ("D", f.add_diag), ("W", f.lwc),
                                       ("A", f.lac), ("I", f.direct_inv)) if on)
    kv = f"q{f.q_bits}{'a' if f.q_asym else ''}g{f.q_groupsize}k{f.k_bits}{'a' if f.k_asym else ''}g{f.k_groupsize}" \
         f"v{f.v_bits}{'a' if f.v_asym else ''}g{f.v_groupsize}"
    element = config.element if config.block is None else config.block.format + "-in46" * config.block.four_over_six_inputs
    name = (f"{element}W{config.w_bits}{'a' if f.w_asym else ''}A{config.a_bits}{'a' if f.a_asym else ''}_{kv}"
            f"_{switches or 'none'}{'' if f.transform else '_notrans'}_e{f.epochs}_bs{f.cali_bsz}_lr{f.flat_lr:g}"
            f"_alpha{f.diag_alpha:g}{'_warm' if f.warmup else ''}_{calib}.safetensors")
    return Path(root) / config.name / model_folder(model_name, fingerprint) / name


def matrix_metadata(config: QuantConfig, model_name: str, fingerprint: dict) -> dict:
    flat = asdict(config.flat)
    transform_keys = ("transform", "direct_inv", "add_diag", "lwc", "lac", "q_bits", "k_bits", "v_bits")
    metadata = {"format": MATRIX_FORMAT, "model": model_name, "fingerprint": fingerprint, "element": config.element,
                "w_bits": config.w_bits, "a_bits": config.a_bits, "settings": {k: flat[k] for k in transform_keys}}
    if config.block is not None:  # transforms and clips trained for a named format's quantizers
        metadata["named_format"] = config.block.format
        if config.block.four_over_six_inputs:  # trained through it (files without the key were not)
            metadata["four_over_six_inputs"] = True
    return metadata


def read_matrices(path, expected: dict) -> dict:
    """{block index: tensors} of a matrix file, refused if it was made for another model or settings."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {})["flatquant"])
        tensors = load_file(str(path))
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as error:
        raise MatrixFileError(f"{path} is not a FlatQuant matrix file of this toolkit ({type(error).__name__}); "
                              "re-run calibration or pass another --matrix_path") from None
    if not same_model(meta["fingerprint"], expected["fingerprint"]):
        raise MatrixFileError(f"{path} was calibrated for another model ({meta['model']}); pass this model's --matrix_path")
    for key in ("named_format", "four_over_six_inputs", "element", "w_bits", "a_bits", "settings"):
        if meta.get(key) != expected.get(key):
            raise MatrixFileError(f"{path} was made with {key}={meta.get(key)}, not {expected.get(key)}; "
                                  "use the same FlatQuant settings or recalibrate")
    return {int(i): {k: v for k, v in tensors.items() if k.startswith(f"{p}.")} for i, p in meta["blocks"].items()}


def write_matrices(path, metadata: dict, blocks: dict):
    """blocks: {index: (prefix, tensors)}; written atomically (a crash or a second run never leaves half a file)."""
    tensors = {k: v for _, values in blocks.values() for k, v in values.items()}
    meta = {**metadata, "blocks": {str(i): prefix for i, (prefix, _) in blocks.items()}}
    atomic_write(path, lambda temporary: save_file(tensors, str(temporary),
                                                   metadata={"flatquant": json.dumps(meta, default=str)}))


@torch.no_grad()
def flat_quantize(model, config: QuantConfig, calib_data: torch.Tensor, matrix_path=None, model_name: str | None = None,
                  fingerprint: dict | None = None, adapter: ModelAdapter | None = None, mode: str = "calibrate",
                  progress: bool = True, release_originals: bool = False) -> CalibrationReport:
    """FlatQuant `model` in place. mode: "calibrate" (train every block), "resume" (reuse the blocks already
    in `matrix_path`, train the rest) or "reload" (every block from `matrix_path`, no training). Each trained
    block is written to `matrix_path` at once (nothing is written without one)."""
    from pathlib import Path
    from .models import model_fingerprint
    if mode not in ("calibrate", "resume", "reload"):
        raise ValueError(f"mode must be calibrate, resume or reload, got {mode!r}")
    if mode != "calibrate" and matrix_path is None:
        raise ValueError(f"mode {mode!r} needs a matrix_path")
    adapter = adapter or adapter_for(model)
    dims, flat = model_dims(model), config.flat
    model_name = model_name or getattr(model, "name_or_path", "") or type(model).__name__
    metadata = matrix_metadata(config, model_name, fingerprint or model_fingerprint(model))
    matrix_path = None if matrix_path is None else Path(matrix_path)
    saved = {}
    if mode != "calibrate":
        if not matrix_path.exists():
            if mode == "reload":
                raise MatrixFileError(f"no matrix file at {matrix_path}; calibrate first or pass --matrix_path")
        else:
            saved = read_matrices(matrix_path, metadata)
    blocks = get_module(model, adapter.layers)
    if config.block is not None:
        check_block_sizes(model, config, {f"{adapter.layers}.{name}": module for name, module in blocks.named_modules()
                                          if isinstance(module, nn.Linear)})
    if mode == "reload" and len(saved) < len(blocks):
        raise MatrixFileError(f"{matrix_path} holds {len(saved)} of {len(blocks)} blocks; use --resume to finish it")
    if mode != "reload":
        distributed.local_batch(flat.cali_bsz)  # refused now, not at the first training step
    if min(flat.q_bits, flat.k_bits, flat.v_bits) < 16:
        enable_kv_quant(model, adapter)
    report, started = CalibrationReport(), time.perf_counter()
    generator = torch.Generator().manual_seed(config.search.seed)
    written = {i: (f"{adapter.layers}.{i}", saved[i]) for i in saved}
    with PeakMemory(model.device) as memory:
        set_quantized(model, False)
        onloader = onloader_of(model)
        with onloader.capturing(blocks):
            captured = capture_block_inputs(model, adapter, calib_data, 1)
        hidden = captured.hidden
        # blocks are calibrated in float32 whatever the model's dtype (float64 stays float64)
        work = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        hidden = hidden.to(work)
        hidden_q = hidden
        for index, block in enumerate(tqdm(blocks, desc="FlatQuant blocks", disable=not progress)):
            block_start, prefix = time.perf_counter(), f"{adapter.layers}.{index}"
            with onloader.onload(block, index) as device:  # the block on the calibration device (utils/onload.py)
                hidden, hidden_q, call_kwargs = moved((hidden, hidden_q, captured.call_kwargs[index]), device)
                dtype = next(block.parameters()).dtype
                block.to(work)
                targets, input_absmax = _group_input_absmax(block, adapter, hidden, call_kwargs)
                flat_block = FlatBlock(block, adapter, config, dims, generator).to(hidden.device)
                flat_block.install(block)
                if index in saved:
                    flat_block.load_matrices(prefix, saved[index])
                    history = []
                else:
                    flat_block.init_diag(input_absmax, flat.diag_alpha)
                    history = train_block(flat_block, block, flat, hidden, targets, call_kwargs)
                    written[index] = (prefix, flat_block.matrices(prefix))
                    if matrix_path is not None and distributed.is_main():
                        write_matrices(matrix_path, metadata, written)
                clips = flat_block.weight_clip_factors()
                flat_block.fold_into(block)
                del flat_block
                if config.block is not None:
                    layers = quantize_format_weights(block, adapter, config, hidden_q, call_kwargs, clips)
                else:
                    losses = quantize_block_weights(block, adapter, config, hidden_q, call_kwargs) if config.w_bits < 16 else {}
                    layers = {name: {"loss": loss} for name, loss in losses.items()}
                if release_originals:
                    for module in block.modules():
                        if isinstance(module, QuantLinear):
                            module.release_original()
                hidden_q = run_block(block, hidden_q, call_kwargs, 1)
                hidden = targets
                block.to(dtype)
            report.layers.update({f"{prefix}.{name}": entry for name, entry in layers.items()})
            report.layers[prefix] = {"train_loss": history}
            report.block_seconds.append(time.perf_counter() - block_start)
    report.seconds, report.peak_memory_mb = time.perf_counter() - started, memory.peak_mb
    return report
