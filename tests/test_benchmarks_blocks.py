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


def test_the_blocks_table_pairs_our_rows_with_the_peer_rows(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from benchmarks import smollm2_table
    results = {"fp32": (20.0, 30.0, None), "peer_fp32": (20.0, 30.0, None), "nvfp4_rtn": (25.0, 36.0, 10.0),
               "peer_nvfp4_rtn": (20.0 + 4.0, 30.0 + 8.0, 40.0), "peer_mxfp4_rtn": (28.0, 40.0, 5.0)}
    for name, (wiki, news, seconds) in results.items():
        folder = tmp_path / "results" / "blocks_table" / name
        folder.mkdir(parents=True)
        calibration = None if seconds is None else {"seconds": seconds, "peak_memory_mb": 1000.0}
        (folder / "results.json").write_text(json.dumps({"ppl": {"enwiki-heldout": wiki, "abcnews": news},
                                                         "calibration": calibration}))
    monkeypatch.setattr(smollm2_table, "ROOT", tmp_path)
    folder, _, rows = smollm2_table.TABLES["blocks"]
    table = smollm2_table.blocks_table(SimpleNamespace(table="blocks", peer_venv=".venv-peer"), folder, rows,
                                       smollm2_table.PEER_ROWS["blocks"])
    assert [row["method"] for row in table] == ["FP32", "llm-compressor FP32", "NVFP4 RTN", "llm-compressor NVFP4 RTN",
                                                "llm-compressor MXFP4 RTN"]
    ours = table[2]
    assert (ours["gap enwiki-heldout"], ours["gap abcnews"]) == (5.0, 6.0)
    assert (ours["ours/peer enwiki-heldout"], ours["ours/peer abcnews"]) == (25.0 / 24.0, 36.0 / 38.0)
    assert (ours["calibration s"], table[3]["calibration s"]) == (10.0, 40.0)
    assert ours["ours/peer calibration s"] == 0.25 and table[3]["ours/peer calibration s"] is None
    assert table[0]["ours/peer calibration s"] is None  # FP32 calibrates nothing
    assert table[3]["ours/peer abcnews"] is None and table[4]["ours/peer abcnews"] is None
    assert table[3]["command"].split()[1:3] == ["benchmarks/peer_llmcompressor.py", "--model"]


def test_a_peer_checkpoint_is_scored_on_the_tables_windows_without_calibration_flags():
    """llm-compressor's checkpoint is read as it is (main.py refuses calibration flags there) on the perplexity
    windows our rows use."""
    from benchmarks.smollm2_table import checkpoint_eval_command, command
    ours = main.build_parser().parse_args(command("blocks", "nvfp4_rtn")[2:])
    argv = checkpoint_eval_command("blocks", "peer_nvfp4_rtn")[2:]
    peer = main.build_parser().parse_args(argv)
    assert peer.model_args == "pretrained=results/blocks_table/peer_nvfp4_rtn/checkpoint"
    assert (peer.eval_ppl, peer.ppl_seqlen, peer.ppl_limit) == (ours.eval_ppl, ours.ppl_seqlen, ours.ppl_limit)
    assert not {"--calib_dataset", "--calib_seqlen", "--calib_size", "--quant_config"} & set(argv)
