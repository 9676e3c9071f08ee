"""Files written before the scheme / pipeline / adapter refactoring still load and give the same logits bit for
bit. tests/fixtures/ holds a tiny LLaMA's FPQ, MinMax INT and FlatQuant files and the logits they gave,
written by the code at commit 9a995ae (tiny_llama() of conftest.py, calibration ids randint(0, 256, (4, 32))
of seed 1, FPQ with 1 round over 10 candidates, FlatQuant with 1 epoch on 4 windows)."""
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from configs import load_config
from conftest import tiny_llama
from utils.calibrate import prepare_model
from utils.flatquant import flat_quantize
from utils.models import model_fingerprint
from utils.params import load_params

FIXTURES = Path(__file__).parent / "fixtures"
CALIB = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))


def expected(name):
    return load_file(FIXTURES / "tiny_logits.safetensors")[name]


@pytest.mark.parametrize("name", ["FPQ_config_llama", "MinMax_INT_config_llama"])
def test_parameter_files_reload_bit_identically(name):
    model, config = tiny_llama(), load_config(name)
    prepare_model(model, config)
    load_params(FIXTURES / f"tiny_{name}.safetensors", model, config)
    with torch.no_grad():
        assert torch.equal(model(CALIB[:2]).logits, expected(name))


def test_flatquant_matrix_file_reloads_to_the_same_logits():
    """To float32 rounding, not bit for bit: the online transforms' small matmuls round differently in their last
    bits on CPUs other than the one that wrote the fixture (seen: 1.4e-6 on logits up to 9), and no element is
    quantized on the other side of a rounding boundary for it."""
    model, config = tiny_llama(), load_config("FlatQuant_config_llama")
    config = replace(config, flat=replace(config.flat, epochs=1, nsamples=4, cali_bsz=2))
    flat_quantize(model, config, CALIB, FIXTURES / "tiny_FlatQuant_config_llama.safetensors", "tiny",
                  model_fingerprint(model), mode="reload", progress=False)
    with torch.no_grad():
        torch.testing.assert_close(model(CALIB[:2]).logits, expected("FlatQuant_config_llama"), rtol=0, atol=1e-5)
