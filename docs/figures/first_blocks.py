"""The README's figures: `--plots` on the first blocks of SmolLM2-135M (the whole model takes too long on a
shared two-core CPU), FPQ W4A4 or FlatQuant W4A4KV4 at short calibration settings.

    python docs/figures/first_blocks.py fpq OUT_DIR        # then: python -m utils.plots OUT_DIR
    python docs/figures/first_blocks.py flatquant OUT_DIR
"""
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from configs import load_config  # noqa: E402
from quant_layers.search import replace_settings  # noqa: E402
from utils import data, models  # noqa: E402
from utils.calibrate import quantize  # noqa: E402
from utils.figure_data import capture_reference, layer_figures, run_caption, run_format_map, write_figure_data  # noqa: E402
from utils.flatquant import flat_quantize  # noqa: E402
from utils.params import save_params  # noqa: E402
from utils.plots import redraw  # noqa: E402

BLOCKS, WINDOWS, SEQLEN = 4, 4, 256


def config_for(method: str):
    if method == "fpq":  # W4A4, embedding and lm_head left out (they are not in the figures)
        config = load_config("FPQ_config_llama").with_qbits([4, 4, 16, 2, 2, 2])
        return replace(config, quantize_lm_head=False,
                       search=replace_settings(config.search, rounds=1, n_candidates=20, strategy="coarse"))
    config = load_config("FlatQuant_config_llama")
    return replace(config, flat=replace(config.flat, epochs=1, nsamples=WINDOWS, cali_bsz=2))


def main(method: str, out: Path):
    model, tokenizer = models.load_model(models.OFFLINE_MODEL, "float32", "cpu", False)
    model.model.layers = model.model.layers[:BLOCKS]
    model.config.num_hidden_layers = BLOCKS
    config, name = config_for(method), f"{models.OFFLINE_MODEL} (first {BLOCKS} blocks)"
    out.mkdir(parents=True, exist_ok=True)
    reference = capture_reference(model, config, data.calibration_samples(tokenizer, "enwiki", 2, SEQLEN, 0))
    fingerprint = models.model_fingerprint(model)
    calib = data.calibration_samples(tokenizer, "enwiki", WINDOWS, SEQLEN, 0)
    if method == "fpq":
        path = out / "params.safetensors"
        quantize(model, config, calib, release_originals=True)
        save_params(path, model, config, name, fingerprint=fingerprint)
    else:
        path = out / "matrices.safetensors"
        flat_quantize(model, config, calib, path, name, fingerprint, release_originals=True)
    result = {"model": name, "quant_config": config.name, "qbits": config.qbits, "param_path": str(path)}
    (out / "results.json").write_text(json.dumps(result))
    write_figure_data(out, {**layer_figures(model, config, reference), "format_map": run_format_map(result)},
                      run_caption(result))
    for png in redraw(out):
        print(png)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
