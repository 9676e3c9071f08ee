"""The library's entry point: `quantize(model, config, calib)` runs the method the config names (utils/methods/)
in place on the model, block by block (utils/pipeline.py).

The other names here are re-exported for library users: the LLM-FP4 block step's helpers and the switches
between full-precision and quantized forward.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from configs import QuantConfig

from . import distributed
from .adapters import ModelAdapter
from .llm_fp4 import calibrate_linear, prepare_model  # noqa: F401  (public library names)
from .methods import ParamFile, method_for
from .models import model_fingerprint
from .pipeline import (CalibrationReport, PeakMemory, quant_modules, release_originals,  # noqa: F401
                       set_quantized)


@torch.no_grad()
def quantize(model, config: QuantConfig, calib_data: torch.Tensor | None, adapter: ModelAdapter | None = None,
             batch_size: int = 1, progress: bool = True, release_originals: bool = False,
             files: ParamFile | None = None) -> CalibrationReport:
    """Calibrate `model` in place for `config` on token windows `calib_data` [N, T]; returns a report.

    After it returns, the model runs fake-quantized. With `release_originals` each module drops its
    full-precision weight once calibrated (one copy of the weights in memory instead of two; the model can no
    longer run unquantized: take `model_fingerprint` before, if needed). With `files` the method writes its
    parameters there as blocks finish, continues an unfinished file (mode "resume") or only loads it ("reload").

    Under an initialised torch.distributed process group each rank calibrates on its share of the windows (every
    rank calls this with the same `calib_data`), the ranks end with the same parameters, and rank 0 writes the
    files (utils/distributed.py).
    """
    calib_data = distributed.local_windows(calib_data)
    if files is not None and files.fingerprint is None:  # taken now: methods such as GPTQ change the weights
        files = replace(files, fingerprint=model_fingerprint(model))
    return method_for(config).quantize(model, config, calib_data, adapter, files, batch_size=batch_size,
                                       progress=progress, release_originals=release_originals)
