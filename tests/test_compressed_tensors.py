"""compressed-tensors checkpoints: what we export is what transformers + compressed-tensors load (in a process that
imports nothing of ours), bit for bit; the packed bytes decode by hand to our codes; a folder written by
compressed-tensors' own compressor reads back through our reader and main.py; our export read back reproduces our
in-memory perplexity exactly; what cannot be exported, an occupied folder and --quant_config with a quantized
folder are refused in one line before any work, and a failed export leaves nothing behind."""
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from cli_helpers import forbid_model_load, one_line_error, run_main
from conftest import tiny_llama
from safetensors.torch import load_file, save_file
from tiny_folder import byte_tokenizer, save_tiny_model

from configs import BlockSettings, QuantConfig, load_config
from utils import data, evaluation
from utils.calibrate import quantize
from utils.compressed_tensors_io import load_compressed
from utils.errors import UsageError
from utils.export import SOURCE_FILE, export

IDS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]

# Run by a fresh interpreter: transformers + compressed-tensors alone load the folder (their default path:
# weights decompressed on the first forward, inputs fake-quantized as the config states).
LOAD_WITH_TRANSFORMERS = """
import sys, torch
from transformers import AutoModelForCausalLM
folder, ids_file, out_file = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(folder)
ids = torch.load(ids_file)
with torch.no_grad():
    logits = model(ids).logits
weights = {name: m.weight.detach() for name, m in model.named_modules() if hasattr(m, "quantization_scheme")}
assert not [name for name in sys.modules if name.split(".")[0] in ("utils", "quant_layers", "configs")]
torch.save({"logits": logits, "weights": weights, "tied": model.lm_head.weight is model.model.embed_tokens.weight,
            "input_quantized": {name: m.quantization_scheme.input_activations is not None
                                for name, m in model.named_modules() if hasattr(m, "quantization_scheme")}}, out_file)
"""


def format_config(format_name, method="rtn", **changes):
    return replace(QuantConfig(name=f"test_{format_name}", method=method, block=BlockSettings(format_name),
                               quantize_lm_head=False, quantize_embedding=False), **changes)


def tiny_in(dtype, wide=False):
    """The tiny Llama built directly in `dtype` (buffers such as the rotary frequencies stay float32, as
    from_pretrained leaves them); `wide`: 128 inputs everywhere, for INT4 groups of 128."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    tiny = tiny_llama()
    config = tiny.config
    if wide:
        config = LlamaConfig(**{**config.to_dict(), "hidden_size": 128, "intermediate_size": 256, "head_dim": 32})
        torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if not wide:
        model.load_state_dict(tiny.state_dict())
    return model.eval().requires_grad_(False)


def transformers_load(folder: Path, tmp_path: Path) -> dict:
    torch.save(IDS, tmp_path / "ids.pt")
    out = tmp_path / "transformers.pt"
    subprocess.run([sys.executable, "-c", LOAD_WITH_TRANSFORMERS, str(folder), str(tmp_path / "ids.pt"), str(out)],
                   check=True, cwd=tmp_path, capture_output=True)
    return torch.load(out)


def mean_nll(logits):
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), IDS[:, 1:].flatten())


def quantized_weights(model) -> dict:
    return {name: m.quantized_weight for name, m in model.named_modules()
            if getattr(m, "quantized_weight", None) is not None and getattr(m, "weight_quantizer", None) is not None}


# (1) transformers + compressed-tensors load our export: the same weights, the same W4A4 (or W4A16) output.
# FP4 formats in bfloat16 (compressed-tensors decompresses E2M1 in bfloat16), INT4 groups in float32
# (transformers casts INT scales to the model's dtype on load).
@pytest.mark.parametrize("format_name,dtype,changes", [
    ("NVFP4", torch.bfloat16, {}), ("MXFP4", torch.bfloat16, {}), ("NVFP4A16", torch.bfloat16, {}),
    ("MXFP4A16", torch.bfloat16, {}), ("W4A16_G128", torch.float32, {}),
    ("NVFP4", torch.bfloat16, {"method": "gptq", "quantize_lm_head": True})])
def test_transformers_loads_our_export_bit_for_bit(format_name, dtype, changes, tmp_path):
    model = tiny_in(dtype, wide=format_name.startswith("W4"))
    config = format_config(format_name, **changes)
    quantize(model, config, IDS, progress=False)
    folder = export(model, tmp_path / "export", byte_tokenizer(), config, max_shard_size="20KB")
    with torch.no_grad():
        ours = model(IDS).logits
    loaded = transformers_load(folder, tmp_path)
    weights = quantized_weights(model)
    assert sorted(loaded["weights"]) == sorted(weights)
    for name, weight in weights.items():
        assert torch.equal(loaded["weights"][name], weight), name
    assert all(loaded["input_quantized"].values()) == (format_name in ("NVFP4", "MXFP4"))
    assert loaded["tied"] == (not changes.get("quantize_lm_head", False))
    relative = (loaded["logits"].float() - ours.float()).norm() / ours.float().norm()
    assert relative < 1e-3 and mean_nll(loaded["logits"]) == pytest.approx(mean_nll(ours).item(), rel=1e-3)
    assert len(list(folder.glob("*.safetensors"))) > 1 and (folder / "model.safetensors.index.json").is_file()
    assert torch.equal(load_compressed(folder, dtype)(IDS).logits, ours)  # and our own reader reads it exactly


# (2) the bytes of one layer, decoded by hand
@pytest.mark.parametrize("format_name", ["NVFP4", "MXFP4"])
def test_packed_bytes_decode_by_hand_to_our_codes_and_values(format_name, tmp_path):
    model = tiny_in(torch.float32)
    quantize(model, format_config(format_name), IDS, progress=False)
    folder = export(model, tmp_path / "export")
    tensors = load_file(folder / "model.safetensors")
    path = "model.layers.1.mlp.down_proj"
    packed, stored = tensors[f"{path}.weight_packed"], tensors[f"{path}.weight_scale"]
    assert packed.dtype == torch.uint8 and packed.shape == (64, 64)
    nibbles = torch.empty(64, 128, dtype=torch.int64)
    nibbles[:, 0::2], nibbles[:, 1::2] = packed & 0xF, packed >> 4  # the even column in the low nibble
    magnitude = torch.tensor(E2M1)[nibbles & 7]  # the sign in the nibble's top bit
    elements = torch.where(nibbles >= 8, -magnitude, magnitude)
    if format_name == "NVFP4":
        assert stored.dtype == torch.float8_e4m3fn and stored.shape == (64, 8)
        raw = stored.view(torch.uint8).long()  # E4M3: 4 exponent bits (bias 7), 3 mantissa bits
        exponent, mantissa = (raw >> 3) & 0xF, (raw & 7).double()
        scale = torch.where(exponent == 0, mantissa / 8 * 2.0 ** -6, (1 + mantissa / 8) * 2.0 ** (exponent - 7))
        # exact so far; then the FP32 division by the global scale, as compressed-tensors dequantizes
        step = scale.float() / tensors[f"{path}.weight_global_scale"]
        block = 16
    else:
        assert stored.dtype == torch.uint8 and stored.shape == (64, 4)
        step, block = 2.0 ** (stored.float() - 127), 32  # E8M0
    values = elements * step.repeat_interleave(block, dim=1)  # float32: one rounding, of E2M1 x step
    module = model.get_submodule(path)
    codes, _ = module.weight_quantizer.encode(module.quantized_weight)
    assert torch.equal(nibbles, codes.long())
    assert torch.equal(values, module.quantized_weight)


def compressed_tensors_folder(preset: str, folder: Path, zero_points: bool = False) -> Path:
    """The tiny Llama (bfloat16) quantized and written by compressed-tensors alone: its preset scheme applied,
    scales from its own helpers, ModelCompressor compressing, save_pretrained and update_config writing."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam
    model = tiny_in(torch.bfloat16)
    scheme = preset_name_to_scheme(preset, ["Linear"])
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is None:
            continue
        weight, args = module.weight.data, module.quantization_scheme.weights
        global_scale = generate_gparam(weight.amin(), weight.amax()) if hasattr(module, "weight_global_scale") else None
        if global_scale is not None:
            module.weight_global_scale.data.copy_(global_scale)
            module.input_global_scale.data.copy_(generate_gparam(torch.tensor(-3.0), torch.tensor(2.5)))
        blocks = weight.unflatten(-1, (-1, args.group_size))
        scale, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args, global_scale=global_scale)
        module.weight_scale.data.copy_(scale)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(folder)
    compressor.update_config(folder)
    byte_tokenizer().save_pretrained(folder)
    if zero_points:  # what older llm-compressor folders carry for symmetric schemes: all-zero zero points
        tensors = load_file(folder / "model.safetensors")
        for key in [k for k in tensors if k.endswith("weight_scale")]:
            tensors[key.replace("weight_scale", "weight_zero_point")] = torch.zeros_like(tensors[key])
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


# (3) a folder compressed-tensors wrote: our reader's weights are its decompression, main.py evaluates it
@pytest.mark.parametrize("preset,zero_points", [("NVFP4", True), ("MXFP4", False)])
def test_a_compressed_tensors_folder_reads_and_evaluates_as_compressed_tensors_runs_it(preset, zero_points, tmp_path,
                                                                                       capsys):
    from transformers import AutoModelForCausalLM
    folder = compressed_tensors_folder(preset, tmp_path / "ct", zero_points)
    reference = AutoModelForCausalLM.from_pretrained(folder)  # compressed-tensors' forward quantizes the inputs
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    tokens = data.evaluation_tokens(byte_tokenizer(), str(text))
    expected = evaluation.perplexity(reference, tokens, 64, None, progress=False)  # the first forward decompresses
    ours = load_compressed(folder, torch.bfloat16)
    for name, module in ours.named_modules():
        if getattr(module, "weight_quantizer", None) is not None:
            assert torch.equal(module.quantized_weight, reference.get_submodule(name).weight), name
            assert module.act_quantizer is not None and module.weight_on_grid
    assert evaluation.perplexity(ours, tokens, 64, None, progress=False) == expected
    code, out, err = run_main(capsys, "--model_args", f"pretrained={folder},dtype=bfloat16", "--device", "cpu",
                              "--eval_ppl", text, "--ppl_seqlen", "64", "--output_path", tmp_path / "results")
    assert code == 0, err
    result = json.loads((tmp_path / "results" / "results.json").read_text())
    assert result["quant_config"] == "compressed-tensors" and result["format"] == f"{preset.lower()}-pack-quantized"
    assert result["ppl"][str(text)] == expected


def test_a_nonzero_zero_point_is_refused(tmp_path):
    folder = compressed_tensors_folder("NVFP4", tmp_path / "ct", zero_points=True)
    tensors = load_file(folder / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight_zero_point"
    tensors[key] = torch.ones_like(tensors[key])
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UsageError, match="asymmetric"):
        load_compressed(folder)


CALIBRATE = ["--device", "cpu", "--calib_dataset", "enwiki", "--calib_size", "4", "--calib_seqlen", "32",
             "--eval_ppl", "enwiki-heldout", "--ppl_seqlen", "64", "--ppl_limit", "3"]


# (4) main.py: calibrate and export, then the export as --model_args pretrained: the same perplexity exactly
@pytest.mark.parametrize("config_name", ["NVFP4_GPTQ_config", "MXFP4_config"])
def test_our_export_read_back_reproduces_the_in_memory_perplexity(config_name, tmp_path, capsys):
    model = save_tiny_model(tmp_path / "model")
    export_folder = tmp_path / "export"
    code, _, err = run_main(capsys, "--model_args", f"pretrained={model}", "--quant_config", config_name, *CALIBRATE,
                            "--ptq_param_path", tmp_path / "p.safetensors", "--save_compressed", export_folder,
                            "--output_path", tmp_path / "calibrated")
    assert code == 0, err
    code, _, err = run_main(capsys, "--model_args", f"pretrained={export_folder}", *CALIBRATE[:2], *CALIBRATE[8:],
                            "--output_path", tmp_path / "read")
    assert code == 0, err
    calibrated, read = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("calibrated", "read"))
    assert calibrated["compressed_checkpoint"] == str(export_folder)
    assert read["ppl"] == calibrated["ppl"]
    # the same model and config again (here from the parameter file): the earlier export is replaced
    code, _, err = run_main(capsys, "--model_args", f"pretrained={model}", "--quant_config", config_name,
                            "--device", "cpu", "--only_eval", "--ptq_param_path", tmp_path / "p.safetensors",
                            "--save_compressed", export_folder)
    assert code == 0, err
    assert json.loads((export_folder / SOURCE_FILE).read_text())["model"] == model


# (5) refusals, before any model is loaded
@pytest.mark.parametrize("flags", [["--quant_config", "FPQ_config_llama"], ["--quant_config", "FlatQuant_config_llama"],
                                   ["--quant_config", "NVFP4_config", "--hadamard"],
                                   ["--quant_config", "NVFP4_GPTQ_config", "--four_over_six_inputs"],
                                   ["--quant_config", "MXFP4_config", "--mx_rule", "floor"],
                                   ["--quant_config", "NVFP4_config", "--ignore", "none"],
                                   ["--quant_config", "NVFP4_FlatQuant_config"]])
def test_what_cannot_be_exported_exactly_is_refused_before_loading(flags, monkeypatch, capsys, tmp_path):
    forbid_model_load(monkeypatch)
    code, _, err = run_main(capsys, *flags, "--device", "cpu", "--save_compressed", tmp_path / "out")
    line = one_line_error(err)
    assert code == 2 and "cannot be written exactly as a compressed-tensors checkpoint" in line
    assert "configs that export: MXFP4_GPTQ_config, MXFP4_best_config, MXFP4_config" in line
    exporting = line.split("configs that export:")[1]
    assert "W4A16_G128_config" in exporting and "FPQ" not in exporting and "FlatQuant" not in exporting
    assert not (tmp_path / "out").exists()


def test_an_occupied_folder_is_refused_before_loading(monkeypatch, capsys, tmp_path):
    forbid_model_load(monkeypatch)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("someone's files")
    code, _, err = run_main(capsys, "--quant_config", "NVFP4_config", "--device", "cpu", "--save_compressed", occupied)
    assert code == 2 and "holds files that are not an export of this toolkit" in one_line_error(err)
    (occupied / "notes.txt").unlink()
    (occupied / SOURCE_FILE).write_text(json.dumps({"model": "another", "format": "NVFP4", "config": None}))
    code, _, err = run_main(capsys, "--quant_config", "NVFP4_config", "--device", "cpu", "--save_compressed", occupied)
    assert code == 2 and "holds another model or config" in one_line_error(err)


@pytest.mark.parametrize("flags", [["--quant_config", "NVFP4_config"], ["--fp_only"],
                                   ["--save_compressed", "elsewhere"], ["--only_eval"]])
def test_a_quantized_folder_takes_no_quantization_flags(flags, monkeypatch, capsys, tmp_path):
    forbid_model_load(monkeypatch)
    folder = tmp_path / "quantized"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "compressed-tensors"}}))
    code, _, err = run_main(capsys, "--model_args", f"pretrained={folder}", "--device", "cpu", *flags)
    line = one_line_error(err)
    assert code == 2 and ("is already quantized" in line or "already quantized)" in line), line


def test_a_failed_export_leaves_nothing_behind(monkeypatch, tmp_path):
    model = tiny_llama()
    config = format_config("NVFP4")
    quantize(model, config, IDS, progress=False)
    target = tmp_path / "export"
    export(model, target, config=config)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    class BrokenTokenizer:
        def save_pretrained(self, folder):
            (Path(folder) / "tokenizer.json").write_text("{")
            raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        export(model, target, BrokenTokenizer(), config)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # the earlier export is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # and no temporary folder is left
    with pytest.raises(OSError, match="disk full"):
        export(model, tmp_path / "new", BrokenTokenizer(), config)
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_python_export_refuses_formats_without_a_layout(tmp_path):
    model = tiny_llama()
    quantize(model, load_config("MinMax_config_llama"), IDS, progress=False)
    with pytest.raises(UsageError, match="no exact compressed-tensors layout|quantized embedding"):
        export(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
