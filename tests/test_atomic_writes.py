"""Parameter, matrix and results files are written atomically: a failure in the middle of a write leaves the
previous file intact, and two writers of the same path leave one complete file."""
import json
import threading

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file

from configs import load_config
from utils import params
from utils.calibrate import quantize
from utils.files import atomic_write, atomic_write_folder, current_umask
from utils.flatquant import write_matrices
from utils.report import write_results


def run_together(*writers):
    """Start every writer at once; re-raise the first failure."""
    errors, start = [], threading.Barrier(len(writers))

    def run(write):
        start.wait()
        try:
            write()
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            errors.append(error)
    threads = [threading.Thread(target=run, args=(w,)) for w in writers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def test_failed_parameter_write_keeps_the_previous_file(tmp_path, calib_ids, monkeypatch):
    config = load_config("MinMax_config_llama")
    model = tiny_llama()
    quantize(model, config, calib_ids, progress=False)
    path = params.save_params(tmp_path / "p.safetensors", model, config, "tiny")
    before = path.read_bytes()
    real_save = params.save_file

    def disk_full(tensors, filename, metadata):  # half a file, then the disk is full
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(len(before) // 2)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(params, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        params.save_params(path, model, config, "tiny")
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


def test_interrupted_write_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("{}")

    def interrupted(temporary):
        temporary.write_text('{"half": ')
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, interrupted)
    assert path.read_text() == "{}" and list(tmp_path.iterdir()) == [path]


def test_two_writers_of_results_leave_one_complete_file(tmp_path):
    results = [{"model": "m", "quant_config": "FP", "ppl": {f"set{i}": float(i) for i in range(size)}} for size in (20000, 60000)]
    for _ in range(5):
        run_together(*(lambda r=r: write_results(tmp_path, r) for r in results))
        assert json.loads((tmp_path / "results.json").read_text()) in results
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md"]


def test_two_writers_of_a_matrix_file_leave_one_complete_file(tmp_path):
    path = tmp_path / "flat_matrices.safetensors"
    blocks = [{0: ("model.layers.0", {"model.layers.0.t": torch.full((256, 256), float(i))})} for i in range(2)]
    for _ in range(5):
        run_together(*(lambda b=b: write_matrices(path, {"format": 1}, b) for b in blocks))
        value = load_file(str(path))["model.layers.0.t"]
        assert value.eq(value[0, 0]).all() and value[0, 0].item() in (0.0, 1.0)
    assert list(tmp_path.iterdir()) == [path]


def test_a_folder_kept_if_present_is_not_replaced_and_nothing_is_left_behind(tmp_path):
    """keep_existing (the converted offline models): a folder another writer put in place stays as it is; one that
    is absent is written with ordinary permissions."""
    target = tmp_path / "cache" / "model"

    def writer(text):
        return lambda folder: (folder / "config.json").write_text(text)
    atomic_write_folder(target, writer("first"), keep_existing=True)
    atomic_write_folder(target, writer("second"), keep_existing=True)
    assert (target / "config.json").read_text() == "first"
    assert [p.name for p in target.parent.iterdir()] == ["model"]
    assert target.stat().st_mode & 0o777 == 0o777 & ~current_umask()
    atomic_write_folder(target, writer("third"))  # without it, the folder is replaced
    assert (target / "config.json").read_text() == "third"
