"""FlatQuant as a registered method: training, folding and matrix files live in utils/flatquant.py."""
from __future__ import annotations

from pathlib import Path

from ..distributed import world_size
from ..errors import Interrupted, UsageError
from ..flatquant import default_matrix_path, flat_quantize
from ..models import adapter_for, get_module
from ..resume import RESUME_HINT, matrix_blocks_saved
from .base import Method, ParamFile, register_method

MATRIX_FILE = "flat_matrices.safetensors"  # the file inside a folder given as the matrix path


@register_method("flatquant")
class FlatQuant(Method):
    def check(self, config):
        if config.flat is None:
            raise UsageError(f"{config.name}: the flatquant method needs FlatSettings (flat=...)")
        if config.block is not None:
            check_named_format(config)

    def calibration_windows(self, config, requested, mode="calibrate") -> int:
        # a reload still runs the blocks; GPTQ and the searches need the full calibration set, and so does NVFP4's
        # input tensor scale (calibrated on the inputs); RTN with dynamic inputs needs one window (per data-parallel
        # rank)
        needs_data = config.flat.weight_quantizer != "rtn" or config.block is not None
        return config.flat.nsamples if mode != "reload" or needs_data else world_size()

    def default_path(self, root, config, model_name, fingerprint, calib_tag) -> Path:
        return default_matrix_path(root, config, model_name, fingerprint, calib_tag)

    def resolve_path(self, path: Path) -> Path:
        return path / MATRIX_FILE if path.is_dir() or not path.suffix else path

    def quantize(self, model, config, calib, adapter, files: ParamFile | None, *, batch_size, progress,
                 release_originals):
        if files is None:
            return flat_quantize(model, config, calib, adapter=adapter, progress=progress,
                                 release_originals=release_originals)
        try:
            report = flat_quantize(model, config, calib, files.path, files.model_name, files.fingerprint,
                                   adapter=adapter, mode=files.mode, progress=progress,
                                   release_originals=release_originals)
        except KeyboardInterrupt:
            blocks = len(get_module(model, (adapter or adapter_for(model)).layers))
            raise Interrupted(f"FlatQuant calibration interrupted; {matrix_blocks_saved(files.path)} of {blocks} "
                              f"blocks are saved in {files.path}; {RESUME_HINT}") from None
        report.param_path = str(files.path)  # a reload still quantizes the weights: the report is a calibration's
        return report


def check_named_format(config):
    """FlatQuant with a named format (NVFP4, MXFP4, ...): the format fixes what INT/FP-only settings would change."""
    flat, block = config.flat, config.block
    refusals = [
        (flat.weight_quantizer == "fpq_search", "LLM-FP4's format search does not apply to a named format; use "
         "weight_quantizer rtn or gptq (the block clip search is BlockSettings(search=True))"),
        (min(flat.q_bits, flat.k_bits, flat.v_bits) < 16, "named formats quantize linear inputs, not the KV cache; "
         "leave --q_bits/--k_bits/--v_bits at 16"),
        (flat.w_asym or flat.a_asym, "block formats are symmetric; drop --w_asym/--a_asym"),
        (flat.w_groupsize != -1, f"the {block.format} blocks are the weight groups; drop --w_groupsize"),
        (block.hadamard, "the learned transforms replace the Hadamard rotation; drop --hadamard"),
        ((config.w_bits, config.a_bits) != (4, 4), f"{block.format} fixes the bits; drop --w_bits/--a_bits"),
    ]
    for refused, why in refusals:
        if refused:
            raise UsageError(f"{config.name} ({block.format}): {why}")
