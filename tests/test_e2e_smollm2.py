"""End to end on the real SmolLM2-135M (offline asset), with small settings so CI can afford it."""
import json

import pytest

import main
from utils.assets import AssetError, asset_path

SMALL = ["--model_args", "pretrained=smollm2-135m-offline", "--device", "cpu", "--calib_dataset", "enwiki",
         "--calib_size", "4", "--calib_seqlen", "128", "--search_round", "1", "--search_intervals", "0.01", "1.2",
         "8", "--act_search_tokens", "256", "--eval_ppl", "enwiki-heldout", "--ppl_seqlen", "256", "--limit", "6"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    try:
        asset_path("smollm2-gguf")
    except AssetError as error:
        pytest.fail(f"offline SmolLM2 asset unavailable: {error}")
    root = tmp_path_factory.mktemp("e2e")

    def run(name, *extra):
        out = root / name
        assert main.main(SMALL + ["--output_path", str(out), *extra]) == 0
        return json.loads((out / "results.json").read_text())

    params = str(root / "fpq.safetensors")
    results = {"fp": run("fp", "--fp_only"),
               "minmax": run("minmax", "--quant_config", "MinMax_config_llama"),
               "fpq": run("fpq", "--quant_config", "FPQ_config_llama", "--ptq_param_path", params)}
    results["reload"] = run("reload", "--quant_config", "FPQ_config_llama", "--only_eval", "--ptq_param_path", params)
    return results


def test_fpq_beats_minmax_fp_in_perplexity(runs):
    fp, minmax, fpq = (runs[k]["ppl"]["enwiki-heldout"] for k in ("fp", "minmax", "fpq"))
    assert fp < fpq < minmax


def test_every_searched_layer_is_no_worse_than_minmax(runs):
    layers = runs["fpq"]["calibration"]["layers"]
    assert len(layers) == 30 * 7 + 1
    for name, layer in layers.items():
        assert layer["searched"] <= layer["minmax"] * (1 + 1e-6), name


def test_only_eval_reproduces_the_calibrated_run_exactly(runs):
    assert runs["reload"]["ppl"] == runs["fpq"]["ppl"]
    assert "calibration" not in runs["reload"]
