"""The block step of the named formats (NVFP4, MX, INT4 groups) under the "rtn" and "gptq" methods.

Per linear group (q/k/v, gate/up: layers that read the same inputs) the inputs are captured once. Input
quantizers are dynamic per token x block; NVFP4's FP32 input tensor scale is calibrated from the inputs' maximum
(llm-compressor's default), and the group's weights share one tensor scale (the smallest of theirs), as vLLM
fuses q/k/v and gate/up into one GEMM with one scale. Weights are rounded to nearest from their block maxima
(rtn), or after LLM-FP4's output-error search of a per-row clip factor (`search`), or by GPTQ (with the clip
factors when searched). With `hadamard` every quantized linear reads its inputs rotated by a block-size Hadamard
matrix, its weight rotated to match. Workflow only: the numerics live in quant_layers.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from configs import QuantConfig
from quant_layers import QuantEmbedding, QuantLinear, make_quantizer
from quant_layers.block_search import (OutputError, group_quantizer, search_clip, search_input_tensor_scale,
                                       weight_quantizer)
from quant_layers.blocks import nvfp4_tensor_scale, tensor_scale_aim
from quant_layers.gptq import add_upper_gram, full_gram, gptq_quantize
from quant_layers.rotations import BlockHadamard
from quant_layers.search import LOCAL, TokenSplit

from .adapters import ModelAdapter
from .distributed import token_split
from .llm_fp4 import prepare_model
from .errors import UsageError
from .onload import onloader_of
from .pipeline import CalibrationReport, calibrate_model, quant_modules, record_inputs


class BlockFormatStep:
    """pipeline.calibrate_model's step for a config with `block` settings, on calibration windows of `window`
    tokens."""

    def __init__(self, config: QuantConfig, window: int):
        self.config, self.settings, self.window = config, config.block, window
        self.weight_scheme, self.input_scheme = config.block.schemes()
        # FlatQuant's folded weights choose GPTQ by their own setting (the method is then "flatquant")
        self.use_gptq = config.method == "gptq" or (config.flat is not None and config.flat.weight_quantizer == "gptq")
        settings = self.settings
        self.method_reads_grams = settings.search or self.use_gptq
        # Xq'X and Xq'Xq: the output error with quantized inputs, which the clip search minimises (and by which it
        # weighs four over six's choice); else they cost two more Gram matrices only for the report (--layer_errors)
        self.output_errors = settings.search or settings.layer_errors

    def embedding(self, table: QuantEmbedding):
        table.weight_quantizer = make_quantizer(self.weight_scheme, table.weight.detach().float())
        table.freeze()

    def block(self, block, index, hidden, call_kwargs, adapter, batch_size, report):
        inputs = {group[0]: self.group_inputs(block.get_submodule(group[0])) for group in adapter.linear_groups}
        fp_out = record_inputs(block, list(inputs), hidden, call_kwargs, lambda name, x: inputs[name].add(x),
                               batch_size)
        for group in adapter.linear_groups:
            modules = {f"{adapter.layers}.{index}.{name}": block.get_submodule(name) for name in group}
            report.layers.update(self.calibrate_group(modules, inputs.pop(group[0])))
        return fp_out

    def head(self, head: QuantLinear, inputs: torch.Tensor) -> dict:
        gathered = self.group_inputs(head)
        gathered.add(inputs)
        return self.calibrate_group({"lm_head": head}, gathered)["lm_head"]

    def group_inputs(self, head: QuantLinear) -> "GroupInputs":
        """An empty GroupInputs for the linears that read `head`'s inputs, gathering what this config reads."""
        return GroupInputs(head.input_transform, self.window, gram=self.method_reads_grams or self.settings.layer_errors,
                           keep=self.output_errors)

    def calibrate_group(self, modules: dict[str, QuantLinear], inputs: "GroupInputs", clips: dict | None = None) -> dict:
        """Quantize linears that read the same inputs (gathered by group_inputs); returns a report entry per module
        path. `clips`: {path: per-row clip factor [rows, 1]} of the block scales (FlatQuant's learned ones),
        replaced by the searched ones when the search is on."""
        split = token_split(inputs.tokens, self.window)
        act = None if self.input_scheme is None else make_quantizer(self.input_scheme, split.max(inputs.maxima))
        tensor_scale = self.shared_tensor_scale([m.weight for m in modules.values()])
        if self.settings.searches_inputs():
            act = self.search_inputs(modules, inputs, act, tensor_scale, clips, split)
        grams = self.grams(inputs, act, split, self.output_errors) if inputs.xx is not None else None
        weights = {path: module.weight.detach().float() for path, module in modules.items()}
        errors = {path: self.output_error(w, grams) for path, w in weights.items()}
        options = {path: self.weight_options(w, tensor_scale, errors[path] if self.method_reads_grams else None,
                                             (clips or {}).get(path)) for path, w in weights.items()}
        report = {path: self.rtn_entry(weights[path], errors[path], options[path]) for path in modules}
        for module in modules.values():
            module.act_quantizer = None if act is None else copy.deepcopy(act)  # each module saves its own
        if self.use_gptq:
            for path, loss in self.gptq(modules, weights, grams, options).items():
                report[path]["gptq_loss"] = loss
        else:
            for path, module in modules.items():
                module.weight_quantizer = weight_quantizer(self.weight_scheme, weights[path], **options[path])
                module.freeze()
        for path, module in modules.items():
            if errors[path] is not None:
                report[path]["output_error"] = errors[path](module.quantized_weight.float()).sum().item()
        return report

    def shared_tensor_scale(self, weights: list[torch.Tensor]) -> torch.Tensor | None:
        """NVFP4: one FP32 tensor scale for fused layers, the smallest of theirs (no block scale saturates)."""
        if self.weight_scheme.scale != "e4m3":
            return None
        aim = tensor_scale_aim(self.settings.four_over_six)
        return torch.stack([nvfp4_tensor_scale(w.detach().abs().amax(), aim) for w in weights]).min()

    def grams(self, inputs: "GroupInputs", act: nn.Module | None, split: TokenSplit = LOCAL,
              quantized: bool = True) -> dict:
        """X'X over the calibration tokens, and with `quantized` Xq'X and Xq'Xq (Xq: the inputs as the input
        quantizer leaves them), summed over every data-parallel rank's tokens as GroupInputs sums X'X: float32
        products per window, their sum in float64, rounded to float32 once."""
        grams = {"xx": full_gram(split.sum(inputs.xx)).float(), "tokens": split.count(inputs.tokens)}
        if quantized and act is None:  # weight-only: the inputs are not quantized
            grams["qx"] = grams["qq"] = grams["xx"]
        elif quantized:
            features = inputs.xx.shape[0]
            sums = {key: torch.zeros(features, features, device=inputs.xx.device, dtype=torch.float64)
                    for key in ("qx", "qq")}
            for x in inputs.windows():
                xq = act(x)
                sums["qx"] += xq.T @ x
                add_upper_gram(sums["qq"], xq)
            grams.update(qx=split.sum(sums["qx"]).float(), qq=full_gram(split.sum(sums["qq"])).float())
        return grams

    def search_inputs(self, modules: dict[str, QuantLinear], inputs: "GroupInputs", act: nn.Module,
                      tensor_scale, clips: dict | None, split: TokenSplit) -> nn.Module:
        """LLM-FP4's alternation for NVFP4 inputs, `rounds` times: the input tensor scale searched for the weights
        as they stand (RTN's at first, then those whose clip was searched for the previous round's inputs)."""
        weights = [module.weight.detach().float() for module in modules.values()]
        given = [(clips or {}).get(path) for path in modules]
        tokens = inputs.stored()
        options = [{"tensor_scale": tensor_scale, "four_over_six": self.settings.four_over_six}
                   | ({} if clip is None else {"clip": clip}) for clip in given]
        for round_index in range(self.config.search.rounds):
            if round_index:
                grams = self.grams(inputs, act, split)
                options = [self.weight_options(w, tensor_scale, self.output_error(w, grams), clip)
                           for w, clip in zip(weights, given)]
            quantized = [weight_quantizer(self.weight_scheme, w, **o)(w) for w, o in zip(weights, options)]
            act = search_input_tensor_scale(act, tokens, torch.cat(weights), torch.cat(quantized), self.config.search,
                                            split)
        return act

    @staticmethod
    def output_error(w: torch.Tensor, grams: dict | None) -> OutputError | None:
        return None if grams is None or "qq" not in grams else OutputError(w, grams["qq"], grams["qx"], grams["xx"])

    def weight_options(self, w: torch.Tensor, tensor_scale, error: OutputError | None, clip=None) -> dict:
        """weight_quantizer's options for w: the group's tensor scale, four over six weighted by the inputs, and
        the clip factors (`clip`, FlatQuant's learned ones, or the searched ones when the search is on)."""
        options = {"tensor_scale": tensor_scale, "four_over_six": self.settings.four_over_six}
        if clip is not None:
            options["clip"] = clip
        if error is not None and self.settings.four_over_six:
            options["importance"] = error.importance()
        if self.settings.search:
            options["clip"] = search_clip(w, error, lambda rows, clip: weight_quantizer(
                self.weight_scheme, rows, **{**options, "clip": clip}), self.config.search)
        return options

    def rtn_entry(self, w: torch.Tensor, error: OutputError | None, options: dict) -> dict:
        """A linear's report entry: its formats, and with the output errors RTN's (no clip: the search's baseline)."""
        entry = {"w_format": self.weight_scheme.name,
                 "a_format": self.input_scheme.name if self.input_scheme else None}
        if error is not None:
            rtn = weight_quantizer(self.weight_scheme, w, **{k: v for k, v in options.items() if k != "clip"})
            entry["rtn_output_error"] = error(rtn(w)).sum().item()
        return entry

    def gptq(self, modules: dict[str, QuantLinear], weights: dict, grams: dict, options: dict) -> dict[str, float]:
        """GPTQ against the Hessian of the full-precision inputs, on the group's weights stacked by rows: one pass
        over the columns for all of them (GPTQResult.rows). Each block's scales come from the weights GPTQ has
        updated when it reaches the block (from the original weight with act-order, so that a block's columns
        stay together). Returns each module's GPTQ loss (its predicted output error per token)."""
        rows = {path: w.shape[0] for path, w in weights.items()}
        clips = [options[path].get("clip") for path in modules]
        clip = None if all(c is None for c in clips) else torch.cat(
            [torch.ones(rows[path], 1, device=w.device) if c is None else c.reshape(-1, 1)
             for (path, w), c in zip(weights.items(), clips)])
        # the group's tensor scale and four over six; each row's clip; four over six weighs the blocks of GPTQ's
        # columns by their own error, not by the inputs' importance
        shared = {k: v for k, v in next(iter(options.values())).items() if k not in ("clip", "importance")}
        hessian = grams["xx"] * (2 / grams["tokens"])  # GPTQ's H = 2/N X'X

        def make(columns):  # GPTQ hands the columns of one group; the row clip applies to every group
            return group_quantizer(self.weight_scheme, columns, clip=clip, **shared)

        result = gptq_quantize(torch.cat(list(weights.values())), hessian, make, percdamp=self.settings.percdamp,
                               act_order=self.settings.act_order, groupsize=self.weight_scheme.group_size,
                               static_groups=self.settings.act_order)
        losses, start = {}, 0
        for path, module in modules.items():
            part = result.rows(slice(start, start + rows[path]))
            start += rows[path]
            module.weight.data.copy_(part.weight.to(module.weight.dtype))
            module.weight_quantizer = part.weight_quantizer()
            module.freeze(on_grid=True)
            losses[path] = part.loss
        return losses


class GroupInputs:
    """What calibrating linears that read the same inputs needs of those inputs, gathered forward by forward as the
    block runs (pipeline.record_inputs), after the group's online rotation: each channel's |x| maximum; with `gram`
    X'X (its tiles on and above the diagonal: quant_layers.gptq.add_upper_gram), a float32 product per window
    summed in float64, so that the sum does not depend on how the windows are dealt to data-parallel ranks (but
    for a rare tie at float32's last bit: GPTQ's act-order sorts the columns by its diagonal, and a swap of two
    near-equal entries changes every later code); with `keep` the inputs themselves, which the clip search and the
    output errors read once the input quantizer is known (its tensor scale needs the maximum over every token
    first). RTN and GPTQ keep no inputs: in^2 floats, not tokens x in."""

    def __init__(self, transform: nn.Module | None, window: int, gram: bool, keep: bool):
        self.transform, self.window = transform, window
        self.maxima = self.xx = None
        self.tokens, self.gram, self.kept = 0, gram, [] if keep else None

    def add(self, x: torch.Tensor):
        """Inputs [..., in] of one forward: whole windows of `window` tokens."""
        x = x.detach().reshape(-1, x.shape[-1])
        x = x if self.transform is None else self.transform(x)
        peak = x.abs().amax(0, keepdim=True)
        self.maxima = peak if self.maxima is None else torch.maximum(self.maxima, peak)
        self.tokens += x.shape[0]
        if self.kept is not None:
            self.kept.append(x)
        if self.gram:
            if self.xx is None:
                self.xx = torch.zeros(x.shape[-1], x.shape[-1], device=x.device, dtype=torch.float64)
            for start in range(0, x.shape[0], self.window):
                add_upper_gram(self.xx, x[start:start + self.window].float())

    def stored(self) -> torch.Tensor:
        """The kept inputs [tokens, in]."""
        if self.kept is None:
            raise ValueError("these inputs were gathered without keeping them (keep=False)")
        if len(self.kept) != 1:
            self.kept = [torch.cat(self.kept)]
        return self.kept[0]

    def windows(self):
        """The kept inputs window by window, in float32."""
        inputs = self.stored()
        for start in range(0, inputs.shape[0], self.window):
            yield inputs[start:start + self.window].float()


def prepare_formats(model, config: QuantConfig, adapter: ModelAdapter | None = None) -> ModelAdapter:
    """Wrap the model's linears (prepare_model), refuse blocks that do not divide a layer, and with `hadamard`
    rotate each quantized linear's inputs and weight (idempotent: an already rotated linear is left alone)."""
    adapter = prepare_model(model, config, adapter)
    check_block_sizes(model, config)
    if config.block.hadamard:
        size, rotated = config.scheme("weight").group_size, []
        for module in quant_modules(model).values():
            if isinstance(module, QuantLinear) and not isinstance(module.input_transform, BlockHadamard):
                on_disk = module.weight.device.type == "meta"  # its block is read when used (utils/onload.py)
                module.input_transform = BlockHadamard(size).to(model.device if on_disk else module.weight.device)
                rotated.append(module)
        onloader_of(model).rewrite_weights(model, rotated, rotate_weight)
    return adapter


def rotate_weight(module: QuantLinear):
    """W -> W H, so that the rotated inputs x H give the same products (H is orthogonal and symmetric)."""
    module.weight.data = module.input_transform(module.weight.data)


def calibrate_formats(model, config: QuantConfig, calib_data: torch.Tensor, adapter: ModelAdapter | None = None,
                      batch_size: int = 1, progress: bool = True, release_originals: bool = False,
                      restored_blocks: int = 0, after_block=None) -> CalibrationReport:
    """Calibrate `model` in place for a named-format `config` on token windows `calib_data` [N, T]."""
    adapter = prepare_formats(model, config, adapter)
    step = BlockFormatStep(config, calib_data.shape[1])
    return calibrate_model(model, step, calib_data, adapter, batch_size, progress, release_originals,
                           config.feed_quantized, restored_blocks, after_block, config.calib_attention)


def check_block_sizes(model, config: QuantConfig, modules: dict | None = None):
    """Refuse, before any work, a format whose block (or group) does not divide a quantized layer's inputs: the
    model's wrapped modules, or `modules` {path: linear or embedding} (FlatQuant's, before it wraps them)."""
    size = config.scheme("weight").group_size
    for name, module in (quant_modules(model) if modules is None else modules).items():
        width = module.embedding_dim if isinstance(module, (QuantEmbedding, nn.Embedding)) else module.in_features
        if width % size:
            raise UsageError(f"{config.block.format} blocks of {size} do not divide the {width} inputs of {name}; "
                             "choose another --format")
