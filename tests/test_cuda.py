"""The CUDA path (skipped without a GPU): LLM-FP4 and FlatQuant calibrate a tiny LLaMA on the GPU, keep every
tensor there, and agree with the CPU run."""
from dataclasses import replace

import pytest
import torch

from configs import load_config
from conftest import tiny_llama
from quant_layers import QuantLinear
from utils.calibrate import quantize, set_quantized

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def calibrated(config, ids, device):
    model = tiny_llama().to(device)
    report = quantize(model, config, ids.to(device), progress=False)
    with torch.no_grad():
        out = model(ids.to(device)).logits.float().cpu()
    return model, report, out


def test_fpq_on_cuda_matches_cpu(calib_ids):
    config = load_config("FPQ_config_llama")
    config = replace(config, search=replace(config.search, n_candidates=20, rounds=2))
    model, report, gpu = calibrated(config, calib_ids, "cuda")
    _, _, cpu = calibrated(config, calib_ids, "cpu")
    assert all(m.quantized_weight.is_cuda for m in model.modules() if isinstance(m, QuantLinear))
    assert report.peak_memory_mb > 0
    assert (gpu - cpu).norm() / cpu.norm() < 0.05  # a near-tie in the grid search may pick another point


def test_flatquant_on_cuda_folds_exactly_and_matches_cpu(calib_ids):
    config = load_config("FlatQuant_config_llama")
    config = replace(config, flat=replace(config.flat, epochs=2, nsamples=4, cali_bsz=2))
    reference = tiny_llama()(calib_ids).logits.detach()
    model, _, gpu = calibrated(config, calib_ids, "cuda")
    _, _, cpu = calibrated(config, calib_ids, "cpu")
    assert (gpu - cpu).norm() / cpu.norm() < 0.05
    unquantized = replace(config, w_bits=16)
    model, _, _ = calibrated(unquantized, calib_ids, "cuda")
    set_quantized(model, False)
    with torch.no_grad():
        off = model(calib_ids.cuda()).logits.float().cpu()
    assert (off - reference).norm() / reference.norm() < 1e-4


@pytest.mark.parametrize("weights", ["gptq", "fpq_search"])
def test_flatquant_weight_quantizers_on_cuda(weights, calib_ids):
    name = "FlatQuant_FP_config_llama" if weights == "fpq_search" else "FlatQuant_config_llama"
    config = load_config(name)
    config = replace(config, flat=replace(config.flat, epochs=1, nsamples=4, cali_bsz=2, weight_quantizer=weights),
                     search=replace(config.search, n_candidates=10, rounds=1))
    _, _, gpu = calibrated(config, calib_ids, "cuda")
    assert torch.isfinite(gpu).all()
