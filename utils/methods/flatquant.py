"""FlatQuant as a registered method: training, folding and matrix files live in utils/flatquant.py."""
from __future__ import annotations

from pathlib import Path

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

    def calibration_windows(self, config, requested, mode="calibrate") -> int:
        # a reload still runs the blocks; GPTQ and the search need the full calibration set, RTN one window
        return 1 if mode == "reload" and config.flat.weight_quantizer == "rtn" else config.flat.nsamples

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
