"""Every complete_scripts/ script must give main.py command lines that parse and build their config
(a dry run through the scripts themselves, DRY_RUN=1), so none of them rots."""
import os
import subprocess
from pathlib import Path

import pytest

import main
from utils.cli_checks import check_arguments

SCRIPTS = sorted(p for p in (Path(__file__).resolve().parents[1] / "complete_scripts").rglob("*.sh")
                 if p.name != "common.sh")


def dry_run(script, *extra):
    printed = subprocess.run(["bash", str(script), *extra], env={**os.environ, "DRY_RUN": "1"},
                             capture_output=True, text=True, check=True).stdout
    commands, current = [], []
    for line in printed.splitlines():
        if line == "--":
            commands.append(current)
            current = []
        else:
            current.append(line)
    assert not current, "every dry-run command ends with a '--' line"
    return [main.build_parser().parse_args(argv) for argv in commands]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_script_command_lines_parse(script):
    runs = dry_run(script, "--limit", "2")
    assert runs
    outputs = [args.output_path for args in runs]
    assert len(set(outputs)) == len(outputs), "two runs of one script would share an output folder"
    for args in runs:
        assert args.limit == 2 and args.tasks
        check_arguments(args)  # no flag out of range, contradicting another or ignored by the config
        if not args.fp_only:
            assert main.make_config(args).name == args.quant_config


def test_table_scripts_cover_the_paper_settings():
    """E/W/A 4/4/4, 4/4/8, 4/4/16, 8/8/8 map to --qbits W A E (spec: paper 4/4/8 is --qbits 4 8 4)."""
    script = next(s for s in SCRIPTS if s.parent.name == "LLaMA-7B" and s.name == "FPQ.sh")
    qbits = {tuple(args.qbits) for args in dry_run(script)}
    assert qbits == {(4, 4, 4, 2, 2, 2), (4, 8, 4, 2, 4, 2), (4, 16, 4, 2, 5, 2), (8, 8, 8, 4, 4, 4)}


def test_there_are_scripts_for_every_model_and_method():
    names = {f"{p.parent.name}/{p.stem}" for p in SCRIPTS}
    for model in ("LLaMA-7B", "LLaMA-13B"):
        for method in ("FP", "FPQ", "FPQ_baseline", "MinMax", "MinMax_INT", "MMLU", "GSM8K", "MATH500"):
            assert f"{model}/{method}" in names
    assert {"LLaMA-2-7B/FPQ", "LLaMA-3-8B/FPQ", "Qwen2.5-7B-Instruct/FPQ", "LLaMA-3-8B/FlatQuant"} <= names


def test_flatquant_script_keeps_the_published_recipe():
    """The reference's flags keep their meaning: KV4 asymmetric, group 128, 15 epochs at 5e-3, all four
    learnable parts on; the GPTQ run reloads the RTN run's matrices."""
    script = next(s for s in SCRIPTS if s.parent.name == "LLaMA-3-8B" and s.name == "FlatQuant.sh")
    runs = [args for args in dry_run(script) if not args.fp_only]
    configs = [main.make_config(args) for args in runs]
    for config in configs:
        flat = config.flat
        assert (config.w_bits, config.a_bits, flat.k_bits, flat.v_bits, flat.q_bits) == (4, 4, 4, 4, 16)
        assert flat.k_asym and flat.v_asym and (flat.k_groupsize, flat.v_groupsize) == (128, 128)
        assert (flat.epochs, flat.flat_lr, flat.nsamples, flat.cali_bsz) == (15, 5e-3, 128, 4)
        assert flat.cali_trans and flat.add_diag and flat.lwc and flat.lac and not flat.direct_inv
    assert [c.flat.weight_quantizer for c in configs] == ["rtn", "gptq"]
    assert [args.reload_matrix for args in runs] == [False, True]
    assert all(args.calib_dataset == "wikitext2" and args.calib_seqlen == 2048 for args in runs)


def test_flatquant_flags_left_out_take_the_reference_defaults():
    args = main.build_parser().parse_args(["--quant_config", "FlatQuant_config_llama", "--w_bits", "4",
                                           "--a_bits", "4", "--lwc"])
    flat = main.make_config(args).flat
    assert (flat.k_bits, flat.v_bits) == (16, 16) and flat.lwc and not (flat.lac or flat.cali_trans or flat.add_diag)
    recipe = main.make_config(main.build_parser().parse_args(["--quant_config", "FlatQuant_config_llama"])).flat
    assert (recipe.k_bits, recipe.v_bits) == (4, 4) and recipe.lwc and recipe.lac and recipe.cali_trans
    # numeric flags and --gptq alone change the recipe, they do not switch to the reference's defaults
    tweaked = main.make_config(main.build_parser().parse_args(
        ["--quant_config", "FlatQuant_config_llama", "--epochs", "3", "--gptq"])).flat
    assert tweaked.epochs == 3 and tweaked.weight_quantizer == "gptq" and tweaked.lwc and tweaked.k_bits == 4
    plain = main.make_config(main.build_parser().parse_args(
        ["--quant_config", "FlatQuant_config_llama", "--no_transform"])).flat
    assert not (plain.transform or plain.cali_trans or plain.add_diag or plain.lwc or plain.lac)
    assert (plain.k_bits, plain.v_bits) == (4, 4)
