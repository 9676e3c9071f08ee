"""FlatQuant end to end on the real SmolLM2-135M (offline asset), with small settings so CI can afford it:
the folded model without quantizers is the FP model, FlatQuant beats plain RTN at W4A4KV4, and the matrix
file reloads to the same perplexity."""
import json

import pytest
import torch

import main
from configs import load_config
from utils.calibrate import quantize, set_quantized
from utils.data import calibration_samples
from utils.models import OFFLINE_MODEL, load_model

KV4 = ["--w_bits", "4", "--a_bits", "4", "--k_bits", "4", "--k_asym", "--v_bits", "4", "--v_asym"]
SMALL = ["--model_args", "pretrained=smollm2-135m-offline", "--device", "cpu", "--quant_config",
         "FlatQuant_config_llama", "--calib_dataset", "enwiki", "--nsamples", "4", "--calib_seqlen", "128",
         "--cali_bsz", "2", "--eval_ppl", "enwiki-heldout", "--ppl_seqlen", "256", "--ppl_limit", "6", *KV4]
LEARNED = ["--epochs", "2", "--flat_lr", "5e-3", "--lwc", "--lac", "--cali_trans", "--add_diag"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flat")

    def run(name, *extra):
        out = root / name
        assert main.main(SMALL + ["--output_path", str(out), *extra]) == 0
        return json.loads((out / "results.json").read_text())

    matrices = str(root / "matrices")
    return {"rtn": run("rtn", "--no_transform"),
            "flat": run("flat", *LEARNED, "--matrix_path", matrices),
            "reload": run("reload", *LEARNED, "--reload_matrix", "--matrix_path", matrices)}


def test_flatquant_beats_plain_rtn(runs):
    flat, rtn = runs["flat"]["ppl"]["enwiki-heldout"], runs["rtn"]["ppl"]["enwiki-heldout"]
    assert flat < 0.7 * rtn, (flat, rtn)


def test_reloaded_matrices_reproduce_the_run(runs):
    assert runs["reload"]["ppl"] == runs["flat"]["ppl"]
    assert runs["reload"]["calibration"]["layers"]["model.layers.0"]["train_loss"] == []
    assert len(runs["flat"]["calibration"]["layers"]["model.layers.0"]["train_loss"]) == 2


def test_folded_smollm2_without_quantizers_is_the_fp_model():
    model, tokenizer = load_model(OFFLINE_MODEL, "float32", "cpu")
    ids = calibration_samples(tokenizer, "enwiki", 2, 64)
    with torch.no_grad():
        reference = model(ids).logits
    config = load_config("FlatQuant_config_llama")
    from dataclasses import replace
    config = replace(config, w_bits=16, flat=replace(config.flat, epochs=1, nsamples=2, cali_bsz=2))
    quantize(model, config, ids, progress=False)
    set_quantized(model, False)
    with torch.no_grad():
        off = model(ids).logits
    assert (off - reference).norm() / reference.norm() < 1e-4
