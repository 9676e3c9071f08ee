"""Write the values the FPQ search picks for two small jobs to one safetensors file (the regression fixture of
test_search_regression.py, and what that test compares with it):

- "tiny.*": every quantizer of conftest's tiny LLaMA after a whole FPQ calibration (1 round, n = 10) on the ids
  randint(0, 256, (4, 32)) of seed 1, as in test_legacy_files.py;
- "smollm2.*": the linears of the offline SmolLM2-135M's first block, FPQ on 8 x 256 enwiki tokens, 1 round,
  n = 20, coarse grid, 512-token activation sample (the benchmark's small setting).

Per linear: weight and activation bias, the folded input shift, and each format as [exponent bits, mantissa bits].

python tests/searched_values.py OUT.safetensors
"""
import sys
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from configs import load_config  # noqa: E402
from conftest import tiny_llama  # noqa: E402
from utils.calibrate import prepare_model, quant_modules, quantize  # noqa: E402
from utils.pipeline import CalibrationReport, capture_block_inputs  # noqa: E402


def fpq_config(n: int, **search):
    config = load_config("FPQ_config_llama")
    return replace(config, search=replace(config.search, n_candidates=n, rounds=1, **search))


def quantizer_values(prefix: str, modules: dict) -> dict:
    values = {}
    for name, module in modules.items():
        for slot in ("weight_quantizer", "act_quantizer"):
            quantizer = getattr(module, slot, None)
            if quantizer is not None:
                values[f"{prefix}.{name}.{slot}.bias"] = quantizer.bias
                fmt = quantizer.fmt
                values[f"{prefix}.{name}.{slot}.format"] = torch.tensor([fmt.exponent_bits, fmt.mantissa_bits])
        if getattr(module, "input_shift", None) is not None:
            values[f"{prefix}.{name}.input_shift"] = module.input_shift
    return values


def tiny_values() -> dict:
    model = tiny_llama()
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    quantize(model, fpq_config(10), calib, progress=False)
    return quantizer_values("tiny", quant_modules(model))


@torch.no_grad()
def smollm2_first_block_values() -> dict:
    from utils.data import calibration_samples
    from utils.llm_fp4 import calibrate_block
    from utils.models import OFFLINE_MODEL, get_module, load_model
    model, tokenizer = load_model(OFFLINE_MODEL, "float32", "cpu")
    config = fpq_config(20, strategy="coarse", act_search_tokens=512)
    adapter = prepare_model(model, config)
    captured = capture_block_inputs(model, adapter, calibration_samples(tokenizer, "enwiki", 8, 256))
    block = get_module(model, adapter.layers)[0]
    calibrate_block(block, 0, captured.hidden, captured.call_kwargs[0], adapter, config, 1, CalibrationReport())
    return quantizer_values("smollm2", {f"{adapter.layers}.0.{k}": v for k, v in quant_modules(block).items()})


if __name__ == "__main__":
    values = {**tiny_values(), **smollm2_first_block_values()}
    save_file({k: v.detach().contiguous() for k, v in values.items()}, sys.argv[1])
