"""A value out of range, or two flags that contradict each other, is refused in one line before the model
loads; no value silently becomes a default, "no limit", or a setting other than the one asked for."""
import pytest
from cli_helpers import forbid_model_load, load_tiny_model_instead, one_line_error, run_main

import main
from utils import cli_checks
from utils.errors import UsageError

FLAT = ["--quant_config", "FlatQuant_config_llama"]


@pytest.mark.parametrize("args, message", [
    (["--calib_size", "0"], "--calib_size must be >= 1, got 0"),
    (["--ppl_limit", "0"], "--ppl_limit must be >= 1, got 0"),
    (["--ppl_seqlen", "1"], "--ppl_seqlen must be >= 2, got 1"),
    (["--calib_seqlen", "1"], "--calib_seqlen must be >= 2, got 1"),
    (["--search_round", "0"], "--search_round must be >= 1, got 0"),
    (["--search_intervals", "0", "1.2", "10"], "--search_intervals needs 0 < gamma1 < gamma2, got 0 1.2"),
    (["--search_intervals", "0.5", "0.2", "10"], "--search_intervals needs 0 < gamma1 < gamma2, got 0.5 0.2"),
    (["--search_intervals", "0.01", "1.2", "0"], "--search_intervals n must be a whole number >= 1, got 0"),
    (["--search_intervals", "0.01", "inf", "10"], "--search_intervals needs 0 < gamma1 < gamma2"),
    (["--limit", "0"], "--limit must be a fraction in (0, 1) or a whole number >= 1, got 0"),
    (["--limit", "nan"], "--limit must be a fraction in (0, 1) or a whole number >= 1, got nan"),
    (["--limit", "2.5"], "--limit must be a fraction in (0, 1) or a whole number >= 1, got 2.5"),
    (["--act_search_tokens", "0"], "--act_search_tokens must be >= 1, got 0"),
    (["--num_fewshot", "-1"], "--num_fewshot must be >= 0, got -1"),
    (["--seed", "-3"], "--seed must be in 0..4294967295, got -3"),
    (["--batch_size", "0"], "--batch_size must be a whole number >= 1, 'auto' or 'auto:N', got '0'"),
    (["--batch_size", "many"], "--batch_size must be"),
    ([*FLAT, "--nsamples", "0"], "--nsamples must be >= 1, got 0"),
    ([*FLAT, "--epochs", "-1"], "--epochs must be >= 0, got -1"),
    ([*FLAT, "--cali_bsz", "0"], "--cali_bsz must be >= 1, got 0"),
    ([*FLAT, "--flat_lr", "0"], "--flat_lr must be > 0, got 0"),
    ([*FLAT, "--w_bits", "1"], "--w_bits must be in 2..16"),
    ([*FLAT, "--k_groupsize", "0"], "--k_groupsize must be -1 (one group per row or head) or >= 1, got 0"),
    ([*FLAT, "--w_groupsize", "-2"], "--w_groupsize must be -1"),
])
def test_a_value_out_of_range_is_refused_before_loading(capsys, monkeypatch, args, message):
    forbid_model_load(monkeypatch)
    code, _, err = run_main(capsys, *args, "--device", "cpu")
    assert code == 2 and message in one_line_error(err)


@pytest.mark.parametrize("args, flag, chosen", [
    (["--fp_only", "--only_eval"], "--only_eval", "--fp_only"),
    (["--fp_only", "--ptq_param_path", "p.safetensors"], "--ptq_param_path", "--fp_only"),
    (["--fp_only", "--calib_size", "8"], "--calib_size", "--fp_only"),
    (["--fp_only", "--preshift", "simulated"], "--preshift", "--fp_only"),
    ([*FLAT, "--preshift", "simulated"], "--preshift", "FlatQuant_config_llama"),
    ([*FLAT, "--feed_quantized"], "--feed_quantized", "FlatQuant_config_llama"),
    ([*FLAT, "--calib_attention", "eager"], "--calib_attention", "FlatQuant_config_llama"),
    ([*FLAT, "--reuse_params"], "--reuse_params", "FlatQuant_config_llama"),
    ([*FLAT, "--search_round", "2"], "--search_round", "FlatQuant_config_llama"),  # RTN weights: no search
    ([*FLAT, "--gptq", "--search_intervals", "0.1", "1", "5"], "--search_intervals", "FlatQuant_config_llama"),
    (["--quant_config", "FPQ_baseline_config_llama", "--preshift", "simulated"], "--preshift", "FPQ_baseline"),
    (["--quant_config", "MinMax_config_llama", "--search_strategy", "coarse"], "--search_strategy", "MinMax"),
    (["--lwc"], "--lwc", "FPQ_config_llama"),
    (["--nsamples", "16"], "--nsamples", "FPQ_config_llama"),
    (["--layer_errors"], "--layer_errors", "FPQ_config_llama"),  # the named formats' report only
    (["--matrix_path", "m.safetensors"], "--matrix_path", "FPQ_config_llama"),
])
def test_a_flag_the_run_would_ignore_is_refused_before_loading(capsys, monkeypatch, args, flag, chosen):
    forbid_model_load(monkeypatch)
    code, _, err = run_main(capsys, *args, "--device", "cpu")
    line = one_line_error(err)
    assert code == 2 and f"{flag} has no effect with" in line and chosen in line


@pytest.mark.parametrize("args, first, second", [
    ([*FLAT, "--nsamples", "64", "--calib_size", "32"], "--nsamples", "--calib_size"),
    ([*FLAT, "--matrix_path", "a.safetensors", "--ptq_param_path", "b.safetensors"], "--matrix_path",
     "--ptq_param_path"),
    ([*FLAT, "--reload_matrix", "--resume"], "--reload_matrix", "--resume"),
    ([*FLAT, "--only_eval", "--resume"], "--only_eval", "--resume"),
    ([*FLAT, "--weight_quantizer", "rtn", "--gptq"], "--weight_quantizer", "--gptq"),
])
def test_flatquant_flags_that_override_each_other_are_refused(capsys, monkeypatch, args, first, second):
    forbid_model_load(monkeypatch)
    code, _, err = run_main(capsys, *args, "--device", "cpu")
    assert code == 2 and f"{first} and {second} contradict each other" in one_line_error(err)


@pytest.mark.parametrize("args", [
    [*FLAT, "--nsamples", "64", "--calib_size", "64", "--weight_quantizer", "gptq", "--gptq"],
    ["--quant_config", "FlatQuant_FP_config_llama", "--search_round", "2", "--act_search_tokens", "64"],
    [*FLAT, "--weight_quantizer", "fpq_search", "--search_intervals", "0.1", "1", "5"],
    ["--quant_config", "FPQ_simulated_config_llama", "--preshift", "simulated", "--shift_rounding", "reference"],
    [*FLAT, "--calib_size", "16", "--lwc", "--save_matrix", "--deactive_amp"],
])
def test_flags_the_config_reads_are_accepted(args):
    cli_checks.check_arguments(main.build_parser().parse_args(args))


@pytest.fixture
def folded_param_file(tmp_path, tiny_model, calib_ids):
    """A parameter file calibrated with FPQ_config_llama, whose pre-shift is folded into the weights."""
    from dataclasses import replace

    from configs import load_config
    from utils.calibrate import quantize
    from utils.params import save_params
    config = load_config("FPQ_config_llama")
    config = replace(config, search=replace(config.search, n_candidates=4, rounds=1))
    quantize(tiny_model, config, calib_ids, progress=False)
    return save_params(tmp_path / "folded.safetensors", tiny_model, config, "tiny")


@pytest.mark.parametrize("extra, named", [
    (["--preshift", "simulated"], "--preshift folded"),
    (["--quant_config", "FPQ_simulated_config_llama"], "--preshift folded"),
    (["--fp_numerics", "reference"], "--fp_numerics paper"),
])
def test_evaluating_a_file_under_other_settings_than_its_own_is_refused(capsys, monkeypatch, folded_param_file,
                                                                          extra, named):
    forbid_model_load(monkeypatch)
    code, _, err = run_main(capsys, "--only_eval", "--ptq_param_path", folded_param_file, *extra, "--device", "cpu")
    line = one_line_error(err)
    assert code == 2 and str(folded_param_file) in line and f"pass {named}" in line


@pytest.mark.parametrize("args, flag", [
    (["--fp_only", "--eval_ppl", "abcnews", "--ppl_seqlen", "256"], "--ppl_seqlen 256"),
    (["--quant_config", "MinMax_config_llama", "--calib_seqlen", "129"], "--calib_seqlen 129"),
])
def test_a_window_longer_than_the_model_positions_is_refused_before_calibration(capsys, monkeypatch, args, flag):
    import utils.calibrate
    loads = load_tiny_model_instead(monkeypatch)  # 128 positions
    monkeypatch.setattr(utils.calibrate, "prepare_model", lambda *a: pytest.fail("calibration started"))
    code, _, err = run_main(capsys, *args, "--device", "cpu")
    line = one_line_error(err)
    assert code == 2 and loads and f"{flag} exceeds the model's 128 positions" in line


def test_sequence_lengths_that_fit_pass(tiny_model):
    args = main.build_parser().parse_args(["--calib_seqlen", "128", "--eval_ppl", "abcnews", "--ppl_seqlen", "128"])
    cli_checks.check_sequence_lengths(args, tiny_model.config, calibrating=True)
    args = main.build_parser().parse_args(["--calib_seqlen", "4096", "--only_eval"])  # not calibrating: unused
    cli_checks.check_sequence_lengths(args, tiny_model.config, calibrating=False)
    with pytest.raises(UsageError, match="--calib_seqlen 4096"):
        cli_checks.check_sequence_lengths(args, tiny_model.config, calibrating=True)


def test_the_benchmark_command_lines_pass_the_checks():
    from benchmarks.smollm2_table import TABLES, command
    for table, (_, _, rows) in TABLES.items():
        for row in rows:
            cli_checks.check_arguments(main.build_parser().parse_args(command(table, row)[2:]))
