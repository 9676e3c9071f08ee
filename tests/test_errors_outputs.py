"""Class 5 of the bad-input review: no work lost late. Every output location is checked before the model
loads, calibration never writes under a .pt name, and parameters that cannot be written where asked go to
a fallback path that the message names."""
import shutil
import tempfile

import pytest
from tiny_folder import save_tiny_model

import main
from utils import llm_fp4, models
from utils.resume import is_unfinished


def refuse_model_loading(monkeypatch):
    def load_model(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the output locations were checked")
    monkeypatch.setattr(models, "load_model", load_model)


def bad_locations(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    return {
        "param path is a folder": (["--ptq_param_path", str(tmp_path / "folder")], "is an existing folder"),
        "param path under a file": (["--ptq_param_path", str(tmp_path / "file" / "p.safetensors")],
                                    "is a file, not a folder"),
        "param path .pt": (["--ptq_param_path", str(tmp_path / "x.pt")], "give a path ending in .safetensors"),
        "output path is a file": (["--output_path", str(tmp_path / "file")], "is an existing file"),
        "output path under a file": (["--output_path", str(tmp_path / "file" / "out")], "is a file, not a folder"),
        "output path not writable": (["--output_path", "/proc/llm-fp4-results"], "cannot write in /proc"),
        "matrix path under a file": (["--quant_config", "FlatQuant_config_llama", "--matrix_path",
                                      str(tmp_path / "file" / "m.safetensors")], "is a file, not a folder"),
        "default parameter folder is a file": ([], "the default parameter folder search_result is an existing file"),
    }


CASES = ["param path is a folder", "param path under a file", "param path .pt", "output path is a file",
    "output path under a file", "output path not writable", "matrix path under a file",
    "default parameter folder is a file"]


@pytest.mark.parametrize("case", CASES)
def test_bad_output_location_is_refused_before_the_model_loads(monkeypatch, capsys, tmp_path, case):
    refuse_model_loading(monkeypatch)
    flags, message = bad_locations(tmp_path)[case]
    if case.startswith("default"):
        monkeypatch.chdir(tmp_path)
        (tmp_path / "search_result").write_text("x")
    code = main.main(["--device", "cpu", "--calib_dataset", "enwiki", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]


def test_only_eval_reads_a_reference_pt_without_the_suffix_check(tmp_path):
    args = main.build_parser().parse_args(["--only_eval", "--ptq_param_path", str(tmp_path / "ref.pt")])
    main.check_param_output(args, main.make_config(args))  # reading is no output


def test_parameters_go_to_a_named_fallback_when_the_folder_disappears(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "out"
    real = llm_fp4.calibrate_block

    def block(block_module, index, *args):
        if index == 1:  # the location breaks after the check, during calibration
            shutil.rmtree(out, ignore_errors=True)  # made by the checks, or by a checkpoint
            out.write_text("not a folder any more")
        return real(block_module, index, *args)
    monkeypatch.setattr(llm_fp4, "calibrate_block", block)
    model = save_tiny_model(tmp_path / "model")
    code = main.main(["--model_args", f"pretrained={model}", "--device", "cpu", "--calib_dataset", "enwiki",
                      "--calib_size", "4", "--calib_seqlen", "32", "--search_intervals", "0.01", "1.2", "6",
                      "--search_round", "1", "--ptq_param_path", str(out / "p.safetensors")])
    stdout = capsys.readouterr().out
    fallbacks = list((tmp_path / "tmp" / "llm-fp4-unsaved").iterdir())
    assert code == 0 and len(fallbacks) == 1 and not is_unfinished(fallbacks[0])
    assert f"could not write the quantization parameters to {out / 'p.safetensors'}" in stdout
    assert f"they were written to {fallbacks[0]} instead" in stdout
    monkeypatch.undo()
    assert main.main(["--model_args", f"pretrained={model}", "--device", "cpu", "--only_eval",
                      "--ptq_param_path", str(fallbacks[0])]) == 0
