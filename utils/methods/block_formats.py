"""The named formats (NVFP4, MXFP4, ..., INT4 g128) by round-to-nearest ("rtn") or GPTQ ("gptq"), each with the
output-error clip search and four over six as options. Parameter files: written as blocks finish
(utils/resume.py), resumable, reloadable (GPTQ's weights are stored as their element codes)."""
from __future__ import annotations

from pathlib import Path

from configs import block_parameter_settings

from ..block_formats import calibrate_formats, prepare_formats
from ..errors import ParamFileError, UsageError
from ..params import load_params, model_folder, read_metadata
from ..resume import calibrate_or_load
from .base import Method, ParamFile, register_method

DEFAULT_WINDOWS = 32  # llm-compressor's examples and the LLM-FP4 paper calibrate on a few hundred to 32 windows


@register_method("rtn", "gptq")
class BlockFormats(Method):
    def check(self, config):
        if config.block is None:
            raise UsageError(f"{config.name}: the {config.method} method needs a named format (block=BlockSettings(...))")
        if config.flat is not None:
            raise UsageError(f"{config.name}: FlatQuant settings (flat=...) belong to the flatquant method")
        if config.method == "rtn" and config.block.act_order:
            raise UsageError(f"{config.name}: act-order is a GPTQ setting; use a GPTQ config")

    def calibration_windows(self, config, requested, mode="calibrate") -> int:
        return 0 if mode == "reload" else DEFAULT_WINDOWS if requested is None else requested

    def default_path(self, root, config, model_name, fingerprint, calib_tag) -> Path:
        """search_result/<config>/<model>-<fingerprint>/<format and every setting>.safetensors"""
        b, s = config.block, config.search
        parts = [b.format, config.method, f"rule-{b.mx_rule}", f"inputs-{b.input_tensor_scale}"]
        if b.search:
            parts.append(f"search{s.gamma_low:g}-{s.gamma_high:g}-{s.n_candidates}-{s.grid}-{s.strategy}")
        if b.searches_inputs():
            parts.append(f"rounds{s.rounds}-tokens{s.act_search_tokens or 'all'}-seed{s.seed}")
        parts += ["46"] * b.four_over_six + ["inputs46"] * b.four_over_six_inputs + ["hadamard"] * b.hadamard + [f"damp{b.percdamp:g}"] * (config.method == "gptq") + ["actorder"] * b.act_order
        parts += ["fedquantized"] * config.feed_quantized
        parts += [f"attn-{config.calib_attention}"] * (config.calib_attention is not None)
        parts += [f"head{int(config.quantize_lm_head)}", f"emb{int(config.quantize_embedding)}", calib_tag]
        return Path(root) / config.name / model_folder(model_name, fingerprint) / ("_".join(parts) + ".safetensors")

    def quantize(self, model, config, calib, adapter, files: ParamFile | None, *, batch_size, progress,
                 release_originals):
        if files is None:
            return calibrate_formats(model, config, calib, adapter, batch_size, progress, release_originals)
        adapter = prepare_formats(model, config, adapter)

        def load():
            check_same_settings(files.path, config)
            load_params(files.path, model, config, fingerprint=files.fingerprint)
        return calibrate_or_load(model, config, calib, adapter, files, calibrate_formats, load, release_originals)


def check_same_settings(path: Path, config):
    """A file of the same config name but other format settings (e.g. another --format) is refused."""
    saved = read_metadata(path)["config"]
    saved = {**saved, "block": saved.get("block") and block_parameter_settings(saved["block"])}
    for key, wanted in (("block", config.block.parameter_settings()), ("method", config.method),
                        ("quantize_lm_head", config.quantize_lm_head),
                        ("quantize_embedding", config.quantize_embedding)):
        if saved.get(key) != wanted:
            raise ParamFileError(f"{path} was calibrated with {key} {saved.get(key)}, not {wanted}; pass the "
                                 "settings it was made with, or another --ptq_param_path")
