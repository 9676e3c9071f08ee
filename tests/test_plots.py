"""Figures (utils/figure_data.py collects, utils/plots.py draws) from tiny FPQ and FlatQuant runs: each figure's
JSON has the model's layers and channels, each PNG opens at a sensible size, and `python -m utils.plots DIR`
redraws them (the heat map from the parameter file alone)."""
import json
from dataclasses import replace

import pytest
import torch

from configs import load_config
from conftest import tiny_llama
from utils.calibrate import quantize
from utils.figure_data import capture_reference, layer_figures, run_caption, write_figure_data
from utils.flatquant import flat_quantize
from utils.models import model_fingerprint
from utils.params import save_params
from utils import plots

BLOCKS, HIDDEN, INTERMEDIATE = 2, 64, 128  # tests/conftest.py's tiny LLaMA
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj"]
FIGURES = ("channel_ranges", "layer_error", "flatness", "format_map")


def calibration_ids():
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))


def write_run(folder, model, config, reference, param_path):
    result = {"model": "tiny-llama", "quant_config": config.name, "qbits": config.qbits, "param_path": str(param_path)}
    (folder / "results.json").write_text(json.dumps(result))
    write_figure_data(folder, layer_figures(model, config, reference), run_caption(result))
    return plots.redraw(folder)


@pytest.fixture(scope="module")
def fpq_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fpq")
    config = load_config("FPQ_config_llama")
    config = replace(config, search=replace(config.search, rounds=1, n_candidates=10, strategy="coarse"))
    model, calib = tiny_llama(), calibration_ids()
    reference = capture_reference(model, config, calib[:2])
    fingerprint = model_fingerprint(model)
    quantize(model, config, calib, progress=False, release_originals=True)
    save_params(folder / "params.safetensors", model, config, "tiny-llama", fingerprint=fingerprint)
    return folder, write_run(folder, model, config, reference, folder / "params.safetensors")


@pytest.fixture(scope="module")
def flat_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flat")
    config = load_config("FlatQuant_config_llama")
    config = replace(config, flat=replace(config.flat, epochs=2, nsamples=4, cali_bsz=2))
    model, calib = tiny_llama(), calibration_ids()
    reference = capture_reference(model, config, calib[:2])
    flat_quantize(model, config, calib, folder / "matrices.safetensors", "tiny-llama", progress=False,
                  release_originals=True)
    return folder, write_run(folder, model, config, reference, folder / "matrices.safetensors")


def load(folder, name):
    return json.loads((folder / f"{name}.json").read_text())


def assert_png(path, min_width=800, min_height=300):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    from PIL import Image
    with Image.open(path) as image:
        width, height = image.size
    assert min_width <= width <= 4000 and min_height <= height <= 4000


def spread(values):
    """max / median of a channel-range curve: 1 for a flat one."""
    values = torch.tensor(values)
    return float(values.max() / values.median())


def test_every_figure_is_a_png_with_its_json(fpq_run):
    folder, written = fpq_run
    assert sorted(p.stem for p in written) == sorted(FIGURES)
    for name in FIGURES:
        assert_png(folder / f"{name}.png")
        assert load(folder, name)["caption"] == "tiny-llama | FPQ_config_llama | W4 A4 E4 bits, exponent bits 2 2 2"


def test_channel_ranges_hold_every_channel_before_and_after_the_preshift(fpq_run):
    layers = load(fpq_run[0], "channel_ranges")["layers"]
    heads = ("self_attn.q_proj", "mlp.down_proj")
    assert list(layers) == [f"model.layers.{b}.{n}" for b in range(BLOCKS) for n in heads]
    for path, ranges in layers.items():
        width = INTERMEDIATE if path.endswith("down_proj") else HIDDEN
        assert len(ranges["before"]) == len(ranges["after"]) == width
    q = layers["model.layers.0.self_attn.q_proj"]
    assert spread(q["after"]) < spread(q["before"]) / 2  # the pre-shift evens out the outlier channel


def test_layer_error_compares_minmax_with_the_search_on_every_linear(fpq_run):
    data = load(fpq_run[0], "layer_error")
    assert [r["path"] for r in data["layers"]] == [f"model.layers.{b}.{n}" for b in range(BLOCKS) for n in LINEARS]
    for row in data["layers"]:
        assert 0 < row["calibrated"] < row["minmax"] < 1
    assert data["method"].startswith("FPQ") and data["not_comparable"] == []


def test_format_map_comes_from_the_parameter_file(fpq_run):
    data = load(fpq_run[0], "format_map")
    assert data["blocks"] == BLOCKS and data["linears"] == LINEARS
    for side in ("weight", "activation"):
        assert data[side]["value_kind"] == "exponent bias"
        assert {f for row in data[side]["format"] for f in row} <= {"E1M2", "E2M1", "E3M0"}
        assert all(isinstance(v, float) for row in data[side]["value"] for v in row)


def test_flatquant_flatness_and_errors(flat_run):
    folder, written = flat_run
    assert sorted(p.stem for p in written) == sorted(FIGURES)
    for name in FIGURES:
        assert_png(folder / f"{name}.png")
    layers = load(folder, "flatness")["layers"]
    assert len(layers) == 2 * BLOCKS
    for path, curves in layers.items():
        width = INTERMEDIATE if path.endswith("down_proj") else HIDDEN
        assert {len(c) for c in curves.values()} == {width}
    q = layers["model.layers.0.self_attn.q_proj"]
    assert spread(q["after"]) < spread(q["before"])  # the transform flattens the outlier channel
    error = load(folder, "layer_error")
    assert error["not_comparable"] == ["mlp.up_proj", "self_attn.v_proj"]  # outputs in the folded basis
    for row in error["layers"]:
        if row["path"].endswith(("v_proj", "up_proj")):
            assert row["calibrated"] is None
        else:
            assert 0 < row["calibrated"] < row["minmax"]
    clip = load(folder, "format_map")
    assert clip["weight"]["value_kind"] == clip["activation"]["value_kind"] == "clip factor"
    assert all(0.5 < v < 1 for row in clip["weight"]["value"] for v in row)


def test_cli_redraws_from_the_json_and_the_parameter_file(fpq_run, capsys):
    folder, _ = fpq_run
    for name in FIGURES:
        (folder / f"{name}.png").unlink()
    (folder / "format_map.json").unlink()
    assert plots.main([str(folder)]) == 0
    for name in FIGURES:
        assert_png(folder / f"{name}.png")
    assert load(folder, "format_map")["blocks"] == BLOCKS
    assert plots.main([str(folder / "missing")]) == 2
    assert "no results folder" in capsys.readouterr().err


def test_collect_draws_ours_beside_the_paper(tmp_path):
    from complete_scripts import collect
    tasks = collect.PROTOCOLS["llmfp4"]["tasks"]
    for name, config, qbits in (("fpq", "FPQ_config_llama", [4, 4, 4, 2, 2, 2]), ("fp", "FP", None)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(
            {"model": "huggyllama/llama-7b", "quant_config": config, "qbits": qbits,
             "tasks": {t: {"acc": 0.5} for t in tasks}}))
    assert collect.main([str(tmp_path), "--plots", str(tmp_path / "figures")]) == 0
    data = load(tmp_path / "figures", "paper_comparison")
    fpq = next(r for r in data["rows"] if r["method"] == "FPQ")
    assert fpq["paper"] == collect.LLMFP4_TABLE1[("LLaMA-7B", "FPQ", "4/4/4")] and len(fpq["scores"]) == 6
    assert_png(tmp_path / "figures" / "paper_comparison.png")


def test_main_refuses_plots_without_an_output_folder(capsys):
    import main
    assert main.main(["--plots", "--model_args", "pretrained=smollm2-135m-offline"]) == 2
    assert "--plots" in capsys.readouterr().err
