import json

import pytest

import main


def run_cli(capsys, *args):
    code = main.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("qbits, message", [
    (["4", "4", "4", "4", "2", "2"], "W exponent bits must be in 1..3"),
    (["1", "4", "4", "2", "2", "2"], "W bits must be in 2..16"),
    (["4", "4", "4", "2", "2", "0"], "E exponent bits must be in 1..3"),
])
def test_invalid_qbits_is_one_clear_line(capsys, qbits, message):
    code, _, err = run_cli(capsys, "--qbits", *qbits)
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_unknown_config_lists_the_choices(capsys):
    code, _, err = run_cli(capsys, "--quant_config", "FPT_config_llama")
    assert code == 2 and "FPQ_config_llama" in err


def test_cuda_requested_without_cuda_fails_clearly(capsys, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_cli(capsys, "--device", "cuda")
    assert code == 2 and "--device cpu" in err


def test_search_interval_count_must_be_whole(capsys):
    code, _, err = run_cli(capsys, "--search_intervals", "0.01", "1.2", "10.5")
    assert code == 2 and "whole number" in err


def test_reference_script_flags_are_accepted():
    args = main.build_parser().parse_args(
        "--model hf-causal-experimental --model_args pretrained=huggyllama/llama-7b,use_accelerate=True "
        "--tasks arc_challenge,arc_easy,boolq,hellaswag,openbookqa,piqa,winogrande --device cuda "
        "--batch_size auto --no_cache --num_fewshot 0 --quant_config FPQ_config_llama --qbits 4 4 4 2 2 2 "
        "--calib_size 32 --search_round 3 --search_intervals 0.01 1.2 100 --only_eval "
        "--ptq_param_path ./search_result/x.pt".split())
    config = main.make_config(args)
    assert config.qbits == [4, 4, 4, 2, 2, 2] and config.search.n_candidates == 100 and args.only_eval


def test_results_of_another_model_are_not_overwritten(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"model": "huggyllama/llama-7b"}))
    args = main.build_parser().parse_args(["--output_path", str(tmp_path)])
    with pytest.raises(ValueError, match="another model"):
        main.output_folder(args, "smollm2-135m-offline")


OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def run_offline(*args, timeout=120):
    import os
    import subprocess
    import sys
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, str(root / "main.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **OFFLINE}, cwd=root)


def test_hub_model_offline_fails_at_once_with_the_fix():
    result = run_offline("--model_args", "pretrained=huggyllama/llama-7b", "--device", "cpu")
    assert result.returncode == 2 and "pretrained=smollm2-135m-offline" in result.stderr
    assert "Traceback" not in result.stderr


def test_hub_dataset_offline_fails_at_once_with_the_fix():
    result = run_offline("--calib_dataset", "c4", "--device", "cpu")
    assert result.returncode == 2 and "enwiki" in result.stderr and "Traceback" not in result.stderr


def test_missing_parameter_file_for_only_eval(tmp_path):
    result = run_offline("--only_eval", "--ptq_param_path", str(tmp_path / "none.safetensors"), "--device", "cpu")
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_hub_task_offline_fails_before_calibration_with_the_fix():
    result = run_offline("--tasks", "arc_easy", "--device", "cpu", "--calib_dataset", "enwiki", timeout=90)
    assert result.returncode == 2 and "--task_data arc_easy=FILE.jsonl" in result.stderr
    assert "Traceback" not in result.stderr and "calibrating" not in result.stderr


def test_task_data_for_a_group_is_refused_in_one_line(tmp_path):
    data = tmp_path / "mmlu.jsonl"
    data.write_text("{}\n")
    result = run_offline("--tasks", "mmlu", "--task_data", f"mmlu={data}", "--fp_only", "--device", "cpu", timeout=90)
    assert result.returncode == 2 and "groups such as mmlu" in result.stderr and "Traceback" not in result.stderr


def test_embedded_default_is_the_offline_fpq_w4a4e4_job():
    from utils import lm_eval_tasks
    args = main.build_parser().parse_args(main.EMBEDDED_DEFAULT)
    config = main.make_config(args)
    assert config.name == "FPQ_config_llama" and config.qbits == [4, 4, 4, 2, 2, 2]
    assert args.model_args == "pretrained=smollm2-135m-offline" and args.calib_dataset == "enwiki"
    assert args.ppl_limit == 40 and args.limit == 10 and args.eval_ppl == ["enwiki-heldout", "abcnews"]
    _, tasks = lm_eval_tasks.prepare_tasks([args.tasks], lm_eval_tasks.parse_task_data(args.task_data))
    assert list(tasks) == ["gsm8k_cot_local"]
