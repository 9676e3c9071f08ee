"""Inputs that used to end in a traceback from the project, torch or the standard library end in one line
(exit 2); an error that is not the user's keeps its traceback."""
import pytest
import torch
from cli_helpers import forbid_model_load, one_line_error, run_main, tiny_tokenizer
from conftest import tiny_llama

import main


@pytest.mark.parametrize("args, message", [
    (["--calib_seqlen", "0"], "--calib_seqlen must be >= 2, got 0"),
    (["--ppl_seqlen", "0"], "--ppl_seqlen must be >= 2, got 0"),
    (["--ppl_seqlen", "1"], "--ppl_seqlen must be >= 2, got 1"),
    (["--ppl_seqlen", "-8"], "--ppl_seqlen must be >= 2, got -8"),
    (["--calib_size", "-1"], "--calib_size must be >= 1, got -1"),
    (["--device", "tpu"], "--device must be cpu, cuda, cuda:N or mps, got 'tpu'"),
    (["--model_args", "pretrained=smollm2-135m-offline,dtype=float17"],
     "dtype=float17 is not supported; use one of auto, float16, bfloat16, float32"),
])
def test_bad_values_end_in_one_line_before_loading(capsys, monkeypatch, args, message):
    forbid_model_load(monkeypatch)
    code, _, err = run_main(capsys, *args, *([] if "--device" in args else ["--device", "cpu"]))
    assert code == 2 and message in one_line_error(err)


@pytest.mark.parametrize("flag", ["--calib_dataset", "--eval_ppl"])
def test_a_folder_where_a_text_file_is_expected_is_named(capsys, monkeypatch, tmp_path, flag):
    forbid_model_load(monkeypatch)
    folder = tmp_path / "texts"
    folder.mkdir()
    code, _, err = run_main(capsys, flag, folder, "--device", "cpu")
    assert code == 2 and f"dataset {folder} is a folder, not a file" in one_line_error(err)


def test_device_names_are_read_in_any_case():
    assert main.resolve_device("CPU") == "cpu" and main.resolve_device(" Cpu ") == "cpu"


@pytest.fixture
def pickled_model_folder(tmp_path):
    """A model folder whose pytorch_model.bin pickles a call to print() beside the weights."""
    class Payload:
        def __reduce__(self):
            return print, ("the pickle ran code",)
    folder = tmp_path / "model"
    model = tiny_llama()
    model.config.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    torch.save({**model.state_dict(), "payload": Payload()}, folder / "pytorch_model.bin")
    return folder


def test_pickle_weights_torch_refuses_end_in_one_line(capsys, pickled_model_folder):
    code, out, err = run_main(capsys, "--model_args", f"pretrained={pickled_model_folder}", "--fp_only",
                              "--device", "cpu")
    line = one_line_error(err)
    assert code == 2 and "the pickle ran code" not in out
    assert str(pickled_model_folder) in line and "torch refuses its pickle weights as unsafe" in line
    assert "GLOBAL print" in line


@pytest.mark.parametrize("bug", [ValueError("a bug"), FileNotFoundError("a bug")])  # once caught as user errors
def test_an_error_that_is_not_the_users_keeps_its_traceback(monkeypatch, bug):
    from utils import models

    def broken(*args, **kwargs):
        raise bug
    monkeypatch.setattr(models, "load_model", broken)
    with pytest.raises(type(bug), match="a bug"):
        main.main(["--fp_only", "--device", "cpu"])


def test_gptq_without_enough_damping_is_the_users_error(tiny_model):
    """16 tokens cannot determine 64 input features: undamped, the Hessian is singular (main.py: one line)."""
    from dataclasses import replace

    from configs import load_config
    from utils.errors import UserError
    from utils.flatquant import flat_quantize
    config = load_config("FlatQuant_config_llama")
    config = replace(config, flat=replace(config.flat, transform=False, cali_trans=False, add_diag=False, lwc=False,
                                          lac=False, weight_quantizer="gptq", percdamp=0.0))
    with pytest.raises(UserError, match="not positive definite .* raise --percdamp"):
        flat_quantize(tiny_model, config, torch.randint(0, 256, (1, 16)), progress=False)
