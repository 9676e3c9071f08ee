"""An interrupted FPQ / MinMax calibration resumes block by block to the parameters of an uninterrupted run,
bit for bit; Ctrl-C ends in one line saying what was saved and how to continue (exit 130)."""
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file
from tiny_folder import save_tiny_model

import main
from configs import load_config
from utils import llm_fp4
from utils.calibrate import prepare_model
from utils.errors import Interrupted, ParamFileError
from utils.models import model_fingerprint
from utils.params import load_params
from utils.resume import calibrate_resumable, is_unfinished

EXTRA = {"calibration": {"dataset": "test", "size": 4, "seqlen": 32, "seed": 0}}


def small(name, feed_quantized=False):
    config = load_config(name)
    return replace(config, feed_quantized=feed_quantized, search=replace(config.search, n_candidates=6, rounds=1))


def interrupt_at(monkeypatch, stop_index, calibrated):
    """Ctrl-C when block `stop_index` starts calibrating; `calibrated` records the blocks that were."""
    real = llm_fp4.calibrate_block

    def block(block_module, index, *args):
        if index == stop_index:
            raise KeyboardInterrupt
        calibrated.append(index)
        return real(block_module, index, *args)
    monkeypatch.setattr(llm_fp4, "calibrate_block", block)


def calibrate_file(config, calib_ids, path, resume=False):
    model = tiny_llama()
    adapter = prepare_model(model, config)
    return calibrate_resumable(model, config, calib_ids, adapter, path, "tiny", EXTRA, model_fingerprint(model),
                               resume)


def assert_same_tensors(a: Path, b: Path):
    first, second = load_file(str(a)), load_file(str(b))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


@pytest.mark.parametrize("name, feed", [("FPQ_config_llama", False), ("FPQ_config_llama", True),
                                        ("MinMax_config_llama", False)])
def test_resumed_calibration_is_bit_identical(monkeypatch, calib_ids, tmp_path, name, feed):
    config = small(name, feed)
    calibrate_file(config, calib_ids, tmp_path / "whole.safetensors")

    path, calibrated = tmp_path / "resumed.safetensors", []
    with monkeypatch.context() as patch:
        interrupt_at(patch, 1, calibrated)
        with pytest.raises(Interrupted, match=f"1 of 2 blocks are saved in {path}; .*--resume"):
            calibrate_file(config, calib_ids, path)
    assert calibrated == [0] and is_unfinished(path)
    fresh = tiny_llama()
    prepare_model(fresh, config)
    with pytest.raises(ParamFileError, match="unfinished calibration .*1 of 2 blocks.*--resume"):
        load_params(path, fresh, config)

    with monkeypatch.context() as patch:
        interrupt_at(patch, None, calibrated)
        calibrate_file(config, calib_ids, path, resume=True)
    assert calibrated == [0, 1]  # block 0 was loaded, not searched again
    assert not is_unfinished(path)
    assert_same_tensors(path, tmp_path / "whole.safetensors")


def test_resume_refuses_a_file_of_other_settings(monkeypatch, calib_ids, tmp_path):
    path = tmp_path / "p.safetensors"
    with monkeypatch.context() as patch:
        interrupt_at(patch, 1, [])
        with pytest.raises(Interrupted):
            calibrate_file(small("FPQ_config_llama"), calib_ids, path)
    with pytest.raises(ParamFileError, match="other settings \\(config"):
        calibrate_file(small("FPQ_config_llama", feed_quantized=True), calib_ids, path, resume=True)


def test_interrupt_before_any_block_says_nothing_was_saved(monkeypatch, calib_ids, tmp_path):
    interrupt_at(monkeypatch, 0, [])
    with pytest.raises(Interrupted, match="nothing was saved"):
        calibrate_file(small("FPQ_config_llama"), calib_ids, tmp_path / "p.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_in_the_cli_is_one_line_and_resume_finishes(monkeypatch, capsys, tmp_path):
    model = save_tiny_model(tmp_path / "model")
    common = ["--model_args", f"pretrained={model}", "--device", "cpu", "--calib_dataset", "enwiki",
              "--calib_size", "4", "--calib_seqlen", "32", "--search_intervals", "0.01", "1.2", "6",
              "--search_round", "1"]
    whole, resumed = tmp_path / "whole.safetensors", tmp_path / "resumed.safetensors"
    assert main.main(common + ["--ptq_param_path", str(whole)]) == 0
    with monkeypatch.context() as patch:
        interrupt_at(patch, 1, [])
        code = main.main(common + ["--ptq_param_path", str(resumed)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and "Traceback" not in "".join(err)
    assert err[-1] == (f"interrupted: calibration interrupted; 1 of 2 blocks are saved in {resumed}; "
                       "rerun the same command with --resume to continue")
    assert main.main(common + ["--ptq_param_path", str(resumed), "--resume"]) == 0
    assert_same_tensors(resumed, whole)


def test_ctrl_c_during_flatquant_names_the_blocks_in_the_matrix_file(monkeypatch, capsys, tmp_path):
    from utils import flatquant
    real, trained = flatquant.train_block, []

    def train_block(*args):
        if len(trained) == 1:
            raise KeyboardInterrupt
        trained.append(True)
        return real(*args)
    monkeypatch.setattr(flatquant, "train_block", train_block)
    model, matrices = save_tiny_model(tmp_path / "model"), tmp_path / "m.safetensors"
    code = main.main(["--model_args", f"pretrained={model}", "--device", "cpu", "--calib_dataset", "enwiki",
                      "--quant_config", "FlatQuant_config_llama", "--nsamples", "4", "--cali_bsz", "2",
                      "--epochs", "1", "--calib_seqlen", "32", "--matrix_path", str(matrices)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and err[-1] == (f"interrupted: FlatQuant calibration interrupted; 1 of 2 blocks are saved in "
                                       f"{matrices}; rerun the same command with --resume to continue")


def test_reuse_takes_only_a_finished_file_of_the_same_settings(calib_ids, tmp_path):
    """--reuse_params loads a finished file as this run's result: one calibrated on the previous block's FP output is
    not the result of a run fed quantized outputs (and the two settings have their own default files)."""
    from utils.methods import ParamFile, method_for
    from utils.calibrate import quantize
    from utils.params import read_metadata
    path, calib = tmp_path / "p.safetensors", calib_ids
    fp_fed, quantized_fed = small("FPQ_config_llama"), small("FPQ_config_llama", feed_quantized=True)
    model = tiny_llama()
    fingerprint = model_fingerprint(model)
    quantize(model, fp_fed, calib, files=ParamFile(path, "calibrate", "tiny", fingerprint, EXTRA))
    report = quantize(tiny_llama(), fp_fed, calib, files=ParamFile(path, "resume", "tiny", fingerprint, EXTRA))
    assert report.loaded and read_metadata(path)["config"]["feed_quantized"] is False
    with pytest.raises(ParamFileError, match="other settings \\(config.*--reuse_params"):
        quantize(tiny_llama(), quantized_fed, calib, files=ParamFile(path, "resume", "tiny", fingerprint, EXTRA))
    for method_name in ("FPQ_config_llama", "NVFP4_GPTQ_config"):
        config = load_config(method_name)
        paths = {method_for(c).default_path("root", c, "tiny", fingerprint, "calib")
                 for c in (replace(config, feed_quantized=False), replace(config, feed_quantized=True))}
        assert len(paths) == 2


def count_checkpoints(monkeypatch) -> list[dict]:
    """The `partial` marks of the checkpoints written (the final file has none)."""
    from utils import resume
    written, real = [], resume.save_params

    def save(*args, partial=None, **kwargs):
        if partial is not None:
            written.append(partial)
        return real(*args, partial=partial, **kwargs)
    monkeypatch.setattr(resume, "save_params", save)
    return written


def test_a_checkpoint_is_written_once_the_interval_has_passed(monkeypatch, calib_ids, tmp_path):
    from utils import resume
    written = count_checkpoints(monkeypatch)
    calibrate_file(small("MinMax_config_llama"), calib_ids, tmp_path / "quick.safetensors")
    assert written == []  # two blocks well within a minute: only the finished file is written
    monkeypatch.setattr(resume, "CHECKPOINT_INTERVAL_S", 0.0)
    monkeypatch.setattr(resume, "CHECKPOINT_SHARE", 1.0)  # a write may take all the time: no wait after it
    calibrate_file(small("MinMax_config_llama"), calib_ids, tmp_path / "each.safetensors")
    assert written == [{"blocks_done": 1, "blocks": 2}, {"blocks_done": 2, "blocks": 2}]
    assert_same_tensors(tmp_path / "each.safetensors", tmp_path / "quick.safetensors")


def test_ctrl_c_inside_a_block_saves_the_finished_blocks_only_and_resumes_bit_identically(monkeypatch, calib_ids,
                                                                                           tmp_path):
    from utils.block_formats import BlockFormatStep, calibrate_formats, prepare_formats
    from utils.params import read_metadata
    config = load_config("NVFP4_GPTQ_config")

    def run(path, resume=False):
        model = tiny_llama()
        adapter = prepare_formats(model, config)
        return calibrate_resumable(model, config, calib_ids, adapter, path, "tiny", EXTRA, model_fingerprint(model),
                                   resume, calibrate=calibrate_formats)
    run(tmp_path / "whole.safetensors")
    path, real, groups = tmp_path / "resumed.safetensors", BlockFormatStep.calibrate_group, []

    def group(self, modules, *args, **kwargs):
        groups.append(next(iter(modules)))
        if len(groups) == 6:  # block 1's second group: its q/k/v are already quantized
            raise KeyboardInterrupt
        return real(self, modules, *args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(BlockFormatStep, "calibrate_group", group)
        with pytest.raises(Interrupted, match=f"1 of 2 blocks are saved in {path}"):
            run(path)
    saved = read_metadata(path)
    assert saved["partial"] == {"blocks_done": 1, "blocks": 2}
    assert sorted({name.split(".")[2] for name in saved["modules"]}) == ["0"]
    run(path, resume=True)
    assert_same_tensors(path, tmp_path / "whole.safetensors")
