"""LLM-FP4's methods: MinMax (fixed formats, absmax ranges), FPQ baseline and FPQ (format and exponent-bias
search, FPQ with the pre-shifted bias). Parameter files: written as blocks finish (utils/resume.py), resumable,
reloadable."""
from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from ..llm_fp4 import calibrate_blocks, prepare_model
from ..params import default_path, load_params
from ..resume import calibrate_or_load
from .base import Method, ParamFile, register_method

DEFAULT_WINDOWS = 32  # the paper's 32 calibration segments


@register_method("minmax", "fpq_baseline", "fpq")
class LLMFP4(Method):
    def check(self, config):
        if config.flat is not None:
            raise UsageError(f"{config.name}: FlatQuant settings (flat=...) belong to the flatquant method")
        if config.element == "int" and config.method != "minmax":
            raise UsageError(f"{config.name}: INT elements run with the minmax method (MinMax_INT_config_llama) or "
                             "FlatQuant; the LLM-FP4 search is for FP formats")

    def calibration_windows(self, config, requested, mode="calibrate") -> int:
        return 0 if mode == "reload" else DEFAULT_WINDOWS if requested is None else requested

    def default_path(self, root, config, model_name, fingerprint, calib_tag) -> Path:
        return default_path(root, config, model_name, fingerprint, calib_tag)

    def quantize(self, model, config, calib, adapter, files: ParamFile | None, *, batch_size, progress,
                 release_originals):
        if files is None:
            return calibrate_blocks(model, config, calib, adapter, batch_size, progress, release_originals)
        adapter = prepare_model(model, config, adapter)
        return calibrate_or_load(model, config, calib, adapter, files, calibrate_blocks,
                                 lambda: load_params(files.path, model, config), release_originals)
