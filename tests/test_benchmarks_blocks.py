"""The block-format table's token file holds exactly the windows main.py calibrates and scores with."""
import json

import torch
from safetensors import safe_open

import main
from benchmarks.smollm2_table import write_peer_tokens
from utils import calibrate, evaluation
from utils.pipeline import CalibrationReport

ARGV = ["--model_args", "pretrained=smollm2-135m-offline", "--device", "cpu", "--calib_dataset", "enwiki",
        "--calib_size", "3", "--calib_seqlen", "64", "--seed", "5", "--eval_ppl", "enwiki-heldout", "abcnews",
        "--ppl_seqlen", "64", "--ppl_limit", "4", "--quant_config", "MinMax_config_llama"]


class RecordingLM:
    """Stands in for the model inside the real perplexity loop: keeps every window it is given."""
    device = torch.device("cpu")

    def __init__(self, vocab):
        self.vocab, self.windows = vocab, []

    def __call__(self, ids, use_cache):
        self.windows.append(ids[0].clone())
        return type("Output", (), {"logits": torch.zeros(1, ids.shape[1], self.vocab)})


def windows_main_uses(monkeypatch, tmp_path):
    """main.py run on ARGV with calibration and the model's forward replaced by recorders."""
    seen = {"ppl": {}}

    def record_calibration(model, config, samples, **kwargs):
        seen["calibration"] = samples.clone()
        return CalibrationReport()

    real_perplexity = evaluation.perplexity

    def record_perplexity(model, tokens, seqlen, max_windows, desc):
        recorder = RecordingLM(model.config.vocab_size)
        value = real_perplexity(recorder, tokens, seqlen, max_windows, progress=False, desc=desc)
        seen["ppl"][desc] = torch.stack(recorder.windows)
        return value

    monkeypatch.setattr(calibrate, "quantize", record_calibration)
    monkeypatch.setattr(evaluation, "perplexity", record_perplexity)
    monkeypatch.chdir(tmp_path)  # the parameter-file folder main.py would create stays in tmp
    assert main.main(ARGV) == 0
    return seen


def test_the_token_file_holds_main_py_windows(monkeypatch, tmp_path):
    used = windows_main_uses(monkeypatch, tmp_path)
    path = tmp_path / "tokens.safetensors"
    write_peer_tokens(path, main.build_parser().parse_args(ARGV))
    with safe_open(str(path), "pt") as tokens:
        assert json.loads(tokens.metadata()["ppl_datasets"]) == ["enwiki-heldout", "abcnews"]
        assert sorted(tokens.keys()) == ["calibration", "ppl/abcnews", "ppl/enwiki-heldout"]
        calibration = tokens.get_tensor("calibration")
        assert calibration.shape == (3, 64) and torch.equal(calibration, used["calibration"])
        for dataset in ("enwiki-heldout", "abcnews"):
            windows = tokens.get_tensor(f"ppl/{dataset}")
            assert windows.shape == (4, 64) and torch.equal(windows, used["ppl"][dataset])
