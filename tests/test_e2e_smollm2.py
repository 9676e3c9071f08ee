"""End to end on the real SmolLM2-135M (offline asset), with small settings so CI can afford it."""
import json
from pathlib import Path

import pytest

import main
from utils.assets import AssetError, asset_path

SMALL = ["--model_args", "pretrained=smollm2-135m-offline", "--device", "cpu", "--calib_dataset", "enwiki",
         "--calib_seqlen", "128", "--eval_ppl", "enwiki-heldout", "--ppl_seqlen", "256", "--limit", "6"]
CALIB = ["--calib_size", "4"]  # main.py refuses flags the run would ignore (here: without quantization)
SEARCH = ["--search_round", "1", "--search_intervals", "0.01", "1.2", "8", "--act_search_tokens", "256"]


# a local multiple-choice task in a built-in schema, the cloze task from held-out Wikipedia, and the real
# GSM8K test file through lm-eval's own gsm8k_cot YAML (greedy generation with the KV cache)
SAMPLE = Path(__file__).resolve().parent / "data" / "arc_schema_sample.jsonl"
TASKS = ["--tasks", "arc_easy,enwiki_cloze,gsm8k_cot", "--task_data", f"arc_easy={SAMPLE}", "gsm8k_cot=gsm8k-test",
         "--gen_kwargs", "max_gen_toks=48", "--log_samples"]


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
    results = {"fp": run("fp", "--fp_only", *TASKS),
               "minmax": run("minmax", "--quant_config", "MinMax_config_llama", *CALIB),
               "fpq": run("fpq", "--quant_config", "FPQ_config_llama", "--ptq_param_path", params, *CALIB, *SEARCH,
                          *TASKS)}
    results["reload"] = run("reload", "--quant_config", "FPQ_config_llama", "--only_eval", "--ptq_param_path", params,
                            *CALIB, *SEARCH, *TASKS)
    for name in ("fp", "fpq", "reload"):
        results[name]["lm_eval_output"] = json.loads((root / name / "lm_eval_output.json").read_text())
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


def responses(run, task):
    """Raw model outputs per document: log-likelihoods of the choices, or the generated text."""
    return {sample["doc_id"]: sample["resps"] for sample in run["lm_eval_output"]["samples"][task]}


def test_tasks_run_on_full_precision_and_quantized_models(runs):
    for name in ("fp", "fpq"):
        tasks = runs[name]["tasks"]
        assert set(tasks) == {"arc_easy", "enwiki_cloze", "gsm8k_cot"}
        assert {"acc", "acc_norm"} <= set(tasks["arc_easy"]) and "acc" in tasks["enwiki_cloze"]
        assert "exact_match/strict-match" in tasks["gsm8k_cot"]
        assert runs[name]["evaluation_seconds"] > 0
        assert len(responses(runs[name], "gsm8k_cot_local")) == 6  # --limit 6
    assert runs["fpq"]["versions"]["lm_eval"] and runs["fpq"]["qbits"] == [4, 4, 4, 2, 2, 2]


def test_quantized_model_scores_differently_from_full_precision(runs):
    fp, fpq = responses(runs["fp"], "enwiki_cloze"), responses(runs["fpq"], "enwiki_cloze")
    assert fp.keys() == fpq.keys() and all(fp[d] != fpq[d] for d in fp)  # every log-likelihood moved
    assert responses(runs["fp"], "gsm8k_cot_local") != responses(runs["fpq"], "gsm8k_cot_local")


def test_task_results_are_deterministic_across_runs(runs):
    assert runs["reload"]["tasks"] == runs["fpq"]["tasks"]
    for task in ("arc_easy_local", "enwiki_cloze", "gsm8k_cot_local"):
        assert responses(runs["reload"], task) == responses(runs["fpq"], task)
