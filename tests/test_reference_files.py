"""The reference code's own parameter files (../shared/reference, written by nbasyl/LLM-FP4 on the offline
SmolLM2) reproduce the perplexities the reference code computes with them, and each quantized module computes
what the reference's formulas give (tests/reference_forward.py)."""
from pathlib import Path

import pytest
import torch

import main
import reference_forward
from configs import load_config
from quant_layers import FPFormat, QuantEmbedding, QuantLinear, fp_grid, fp_quantize
from utils import evaluation, models, params
from utils.assets import asset_path
from utils.calibrate import prepare_model, set_quantized

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
QBITS = [4, 4, 4, 2, 2, 2]
# file -> (config, the perplexity the reference code computes with it on the held-out text, here: see the
# perplexity test for how it was measured and how it relates to the figures in ../shared/reference/README.md)
FILES = {"MinMax_W4A4E4.pt": ("MinMax_config_llama", 5045724.87),
         "FPQbase_W4A4E4_r1_n20.pt": ("FPQ_baseline_config_llama", 1071.384),
         "FPQ_W4A4E4_r1_n20.pt": ("FPQ_config_llama", 162.6608)}
REFERENCE_FP32 = 31.64
# the 1 %, except MinMax: that broken a model moves 6.7 % with eager instead of sdpa attention, so on
# another float path (CPU kind, attention kernel) its figure is held within the spread measured for it
PPL_TOLERANCE = {"MinMax_W4A4E4.pt": 0.10, "FPQbase_W4A4E4_r1_n20.pt": 0.01, "FPQ_W4A4E4_r1_n20.pt": 0.01}

needs_files = pytest.mark.skipif(not (REFERENCE / "FPQ_W4A4E4_r1_n20.pt").exists(),
                                 reason=f"the reference parameter files are not at {REFERENCE}")


def heldout_tokens(tokenizer):
    """Documents 240-299 of the abcnews asset, one per line as stored, joined by blank lines."""
    lines = Path(asset_path("abcnews")).read_text(encoding="utf-8").splitlines()
    return tokenizer("\n\n".join(lines[240:300]), add_special_tokens=False, return_tensors="pt").input_ids[0]


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = models.load_model("smollm2-135m-offline", "float32", "cpu", False)
    prepare_model(model, load_config("FPQ_config_llama"))  # the same wrappers for all three configs
    return model, heldout_tokens(tokenizer)


def reference_config(file):
    config = load_config(FILES[file][0]).with_qbits(QBITS)
    return params.config_for_reference_file(REFERENCE / file, config)


@needs_files
def test_fp32_perplexity_matches_the_reference(smollm2):
    model, tokens = smollm2
    set_quantized(model, False)
    assert tokens.numel() // 512 == 29
    assert evaluation.perplexity(model, tokens, 512, progress=False) == pytest.approx(REFERENCE_FP32, rel=1e-3)


@needs_files
@pytest.mark.parametrize("file", list(FILES))
def test_reference_file_reproduces_the_reference_perplexity(smollm2, file):
    """Each file, loaded as `--only_eval` does, scored on all 29 windows against the perplexity the reference
    code computes with it, within the issue's 1 % (MinMax: 10 %, see PPL_TOLERANCE).

    Those figures are the reference's own forward (nbasyl/LLM-FP4: its module wrapping, its only_eval
    initialisation pass and load_state_dict(strict=False) of the file, its quantized modules' forward), run on
    this kind of machine (2026-12-02: torch 2.13 CPU, AVX512, transformers 4.57.6, sdpa attention) with the
    model's rope_theta 100000: FPQ 162.66, FPQ baseline 1071.38, MinMax 5,045,725. Our tool gives the same
    per-window NLLs (FPQ: its logits on window 0 equal the reference's at every module, to the last bit), so
    nothing is left between the two forwards, and transformers 5 vs 4.57.6 changes no bit here.
    The figures in ../shared/reference/README.md (159.16, 1147.22, 4,163,405; FP32 31.64 agrees) are not what
    that code gives on this machine. A W4A4 forward turns last-bit differences of the float path into whole
    rounding steps; measured (2026-12-02): eager instead of sdpa attention gives 163.33, 1067.20 and 5,385,054
    with the reference code (FPQ 163.33 with ours too), AVX2 kernels (ATEN_CPU_CAPABILITY=avx2, MKL and oneDNN
    capped at AVX2) give FPQ 161.96 with ours; thread count, use_cache, train/eval mode and autograd change no
    bit. The README's figures lie 2.2 %, 7 % and 17 % from the reference code's here, beyond all these spreads,
    with no cause found in either code: so this test holds our tool to the reference code's result on one float
    path, and a machine with another one (another CPU kind, eager attention) may need its own figures.
    (Transformers 4.57 reads the model folder written by transformers 5 with rope_theta 10000, the default;
    FP32 then gives 34.77, so the README's runs did not have that fault.)"""
    model, tokens = smollm2
    config = reference_config(file)
    assert config.fp_numerics == "reference"
    params.load_params(REFERENCE / file, model, config)
    ppl = evaluation.perplexity(model, tokens, 512, progress=False)
    assert ppl == pytest.approx(FILES[file][1], rel=PPL_TOLERANCE[file])


@needs_files
@pytest.mark.parametrize("file", list(FILES))
def test_every_module_computes_the_reference_formulas(smollm2, file):
    """In execution order, each wrapped module's output on one window equals the re-statement's bit for bit."""
    model, tokens = smollm2
    params.load_params(REFERENCE / file, model, reference_config(file))
    state = torch.load(REFERENCE / file, weights_only=True)
    mismatches, hooks = [], []

    def check(name):
        def hook(module, inputs, output):
            if isinstance(module, QuantEmbedding):
                expected = reference_forward.embedding_table(state, name, module.weight)
                got = module.quantized_weight
            else:
                expected = reference_forward.linear(state, name, inputs[0], module.weight, module.bias)
                got = output
            if not torch.equal(got, expected):
                mismatches.append((name, (got - expected).abs().max().item()))
        return hook

    for name, module in model.named_modules():
        if isinstance(module, (QuantLinear, QuantEmbedding)):
            hooks.append(module.register_forward_hook(check(name)))
    try:
        with torch.no_grad():
            model(tokens[:512].reshape(1, -1), use_cache=False)
    finally:
        for handle in hooks:
            handle.remove()
    assert not mismatches, f"first module that differs: {mismatches[0]} ({len(mismatches)} in all)"


@needs_files
def test_reference_file_of_another_config_or_qbits_is_refused():
    fpq_file, minmax_file = REFERENCE / "FPQ_W4A4E4_r1_n20.pt", REFERENCE / "MinMax_W4A4E4.pt"
    with pytest.raises(params.ParamFileError, match="MinMax_config_llama"):
        params.config_for_reference_file(minmax_file, load_config("FPQ_config_llama").with_qbits(QBITS))
    with pytest.raises(params.ParamFileError, match="FPQ_config_llama"):
        params.config_for_reference_file(fpq_file, load_config("FPQ_baseline_config_llama").with_qbits(QBITS))
    with pytest.raises(params.ParamFileError, match="W4A4E4 parameters, not W4A8E4"):
        params.config_for_reference_file(fpq_file, load_config("FPQ_config_llama").with_qbits([4, 8, 4, 2, 2, 2]))
    with pytest.raises(params.ParamFileError, match="exponent bits 2 2 2"):  # MinMax formats are fixed by --qbits
        params.config_for_reference_file(minmax_file, load_config("MinMax_config_llama").with_qbits([4, 4, 4, 1, 2, 2]))


@needs_files
def test_cli_refuses_a_reference_file_of_another_config_before_loading_the_model(monkeypatch, capsys):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code = main.main(["--only_eval", "--ptq_param_path", str(REFERENCE / "FPQ_W4A4E4_r1_n20.pt"),
                      "--quant_config", "MinMax_config_llama", "--device", "cpu"])
    assert code == 2
    assert "FPQ_config_llama parameters" in capsys.readouterr().err


@needs_files
def test_cli_says_which_numerics_a_reference_file_selects(monkeypatch, capsys):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: (_ for _ in ()).throw(SystemExit(0)))
    with pytest.raises(SystemExit):
        main.main(["--only_eval", "--ptq_param_path", str(REFERENCE / "FPQ_W4A4E4_r1_n20.pt"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert "fp_numerics=reference, preshift=simulated" in out and out.count("reference parameter file") == 1


def test_reference_numerics_match_the_restatement_bit_for_bit():
    """Random values with outliers, zeros and subnormal-range entries, per-row real biases, every 4-bit format."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g) * torch.logspace(-6, 1, 64)[:, None]
    x[:, :8] = 0.0
    x[:, 8:12] *= 300
    for e in (1, 2, 3):
        bias = torch.rand(64, 1, generator=g) * 8 - 2
        fmt = FPFormat.from_bits(4, e, "reference")
        expected = reference_forward.quantize(x.clone(), torch.tensor(e), torch.tensor(3 - e), bias)
        assert torch.equal(fp_quantize(x, fmt, bias), expected)


def test_reference_numerics_grid_has_the_extra_top_value():
    """The reference's clip 2 * 2^(2^E-1-b): the top binade rounds up to a value the paper's format lacks."""
    paper, ref = FPFormat(2, 1), FPFormat(2, 1, "reference")
    assert paper.maxval(1.0) == 6.0 and ref.maxval(1.0) == 8.0
    sweep = torch.linspace(-10, 10, 200001)
    for fmt in (paper, ref):
        values = fp_quantize(sweep, fmt, 1.0).abs().unique().double()
        assert torch.equal(values, fp_grid(fmt, 1.0))
    assert fp_grid(ref, 1.0).tolist() == fp_grid(paper, 1.0).tolist() + [8.0]
    # the MinMax bias of an absmax keeps that absmax as the clip value in both numerics
    assert ref.maxval(ref.bias_for_maxval(3.7)) == pytest.approx(3.7)
