"""LLM-FP4 toolkit entry point: calibrate (or reload) a fake-quantized causal LM, then evaluate it.

`python main.py` with no arguments runs the embedded default (offline SmolLM2-135M, FPQ W4A4E4,
calibration on offline Wikipedia, perplexity on held-out articles and news, 10 GSM8K test problems through
lm-eval); see README.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from utils.files import check_output_file, check_output_folder
from utils.errors import UsageError, UserError

EMBEDDED_DEFAULT = ["--model_args", "pretrained=smollm2-135m-offline", "--quant_config", "FPQ_config_llama",
                    "--qbits", "4", "4", "4", "2", "2", "2", "--calib_dataset", "enwiki", "--calib_size", "32",
                    "--calib_seqlen", "512", "--search_strategy", "coarse", "--act_search_tokens", "512",
                    "--eval_ppl", "enwiki-heldout", "abcnews", "--ppl_seqlen", "512", "--ppl_limit", "40",
                    "--tasks", "gsm8k_cot", "--task_data", "gsm8k_cot=gsm8k-test", "--limit", "10",
                    "--output_path", "results/default"]
# OpenMP's workers busy-wait between parallel regions by default. Where the cores are shared with other jobs, every
# parallel ATen op then waits for a spinning worker that the scheduler has put aside: ~10-25 ms per op whatever its
# size on two shared cores, which made a small calibration cost as much as its op count, not its work. Sleeping
# workers cost ~0.1 ms per op and change no result (same threads, same partition of the work).
OMP_WAIT_POLICY = "PASSIVE"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and evaluation (lm-eval style)")
    g.add_argument("--model", default="hf", choices=["hf", "hf-causal", "hf-causal-experimental"],
                   help="model backend; all three names load a Hugging Face causal LM")
    g.add_argument("--model_args", default="pretrained=smollm2-135m-offline",
                   help="pretrained=NAME_OR_PATH[,use_accelerate=True][,dtype=float16]; "
                        "pretrained=smollm2-135m-offline is the offline SmolLM2-135M")
    g.add_argument("--tasks", default=None,
                   help="comma-separated lm-eval tasks, e.g. arc_challenge,arc_easy,boolq,hellaswag,openbookqa,"
                        "piqa,winogrande | mmlu | gsm8k_cot | math500; offline also enwiki_cloze")
    g.add_argument("--task_data", nargs="*", default=[], metavar="TASK=FILE",
                   help="run a built-in task on a local file of its schema (FILE may be the asset gsm8k-test)")
    g.add_argument("--include_path", default=None, help="folder of extra lm-eval task YAMLs")
    g.add_argument("--gen_kwargs", default=None, help="lm-eval generation overrides, e.g. max_gen_toks=256")
    g.add_argument("--log_samples", action="store_true", help="keep every sample in lm_eval_output.json")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    g.add_argument("--batch_size", default="1", help="lm-eval batch size, or 'auto'")
    g.add_argument("--no_cache", action="store_true", help="accepted for the reference's scripts; nothing is cached")
    g.add_argument("--num_fewshot", type=int, default=0)
    g.add_argument("--limit", type=float, default=None,
                   help="lm-eval examples per task (a fraction below 1 as in lm-eval); also caps perplexity windows "
                        "unless --ppl_limit is given")
    g.add_argument("--ppl_limit", type=int, default=None, help="perplexity windows per dataset (default: --limit)")
    g.add_argument("--output_path", default=None, help="folder for results.json and results.md")
    g.add_argument("--eval_ppl", nargs="*", default=[],
                   help="perplexity datasets: wikitext2, c4 (hub), enwiki-heldout, abcnews (offline) or text files")
    g.add_argument("--ppl_seqlen", type=int, default=2048, help="perplexity window length")
    g.add_argument("--wandb_name", default=None, help="accepted for the reference's scripts; wandb is not used")
    g.add_argument("--offload", choices=["cpu", "disk"], default=None,
                   help="hold one decoder block at a time on --device for calibration and perplexity: the others wait "
                        "on CPU (cpu) or in the model folder's safetensors shards (disk, for models larger than "
                        "memory; calibrated blocks go to --offload_folder); lm-eval --tasks then reads each block "
                        "once per forward")
    g.add_argument("--offload_folder", default=None, metavar="DIR",
                   help="--offload disk: where calibrated blocks wait (default: a temporary folder, removed at exit)")
    g.add_argument("--plots", action="store_true",
                   help="write figures (PNG, with their data as JSON) next to results.json; needs matplotlib")

    q = p.add_argument_group("quantization")
    q.add_argument("--quant_config", default=None,
                   help="a config name in configs/ (default FPQ_config_llama; not with a compressed-tensors "
                        "checkpoint, which is already quantized)")
    q.add_argument("--qbits", nargs=6, type=int, default=None, metavar="N",
                   help="W A E bits, then W A E exponent bits (paper E/W/A 4/4/8 is --qbits 4 8 4 ...); "
                        "16 bits leaves that operand unquantized (default: 4 4 4 2 2 2; not for named formats)")
    q.add_argument("--calib_dataset", default="c4",
                   help="c4, wikitext2, pile (hub), enwiki (offline) or a .txt/.jsonl file")
    q.add_argument("--calib_size", type=int, default=None,
                   help="calibration segments (default 32; FlatQuant: --nsamples, default 128)")
    q.add_argument("--calib_seqlen", type=int, default=2048,
                   help="tokens per segment (the paper's 2048; the reference code used 1024)")
    q.add_argument("--seed", type=int, default=0, help="seed of the calibration sampling")
    q.add_argument("--search_round", type=int, default=None, help="search rounds (default 3; the named formats' search configs: 1)")
    q.add_argument("--search_intervals", nargs=3, type=float, default=None, metavar=("G1", "G2", "N"),
                   help="bias multipliers gamma1 gamma2 and the number of steps n (default 0.01 1.2 100)")
    q.add_argument("--search_grid", choices=["paper", "reference"], default=None,
                   help="paper: n+1 points with both ends plus gamma=1; reference: the code's n points")
    q.add_argument("--search_strategy", choices=["full", "coarse"], default=None,
                   help="full: every grid point; coarse: coarse pass then refine around the best")
    q.add_argument("--format_space", choices=["paper", "reference"], default=None,
                   help="paper: every ExMy with E>=1; reference: at 8 bits only E5M2..E1M6")
    q.add_argument("--preshift", choices=["simulated", "folded"], default=None,
                   help="FPQ pre-shifted bias: folded into the weights (paper) or simulated (reference code)")
    q.add_argument("--shift_rounding", choices=["paper", "reference"], default=None,
                   help="k_j = round(b_j - rho) (paper) or round(b_j) - round(rho) (reference code)")
    q.add_argument("--fp_numerics", choices=["paper", "reference"], default=None,
                   help="FP clip (2 - 2^-M) 2^(2^E-1-b) (paper) or the reference code's 2 * 2^(2^E-1-b) and its step "
                        "rounding (default: paper; reference when a reference .pt file is loaded)")
    q.add_argument("--act_search_tokens", type=int, default=None,
                   help="tokens used for the activation-bias search loss (default: all; the named formats' search "
                        "configs: 512, for NVFP4's input tensor scale)")
    q.add_argument("--feed_quantized", action=argparse.BooleanOptionalAction, default=None,
                   help="calibrate each block on the previous quantized block's output (default: the config's; on "
                        "in the named formats' GPTQ configs)")
    q.add_argument("--calib_attention", choices=["eager", "sdpa"], default=None,
                   help="attention implementation of the calibration forwards (default: the config's: eager in the "
                        "named formats' configs, as llm-compressor calibrates; else the model's own)")
    q.add_argument("--only_eval", action="store_true", help="skip calibration; load --ptq_param_path")
    q.add_argument("--reuse_params", action="store_true",
                   help="load the parameter file of these exact settings when one exists, else calibrate")
    q.add_argument("--ptq_param_path", default=None,
                   help="parameter file to write (calibration) or read (--only_eval); .safetensors or reference .pt")
    q.add_argument("--fp_only", action="store_true", help="evaluate the full-precision model, no quantization")
    q.add_argument("--save_compressed", default=None, metavar="DIR",
                   help="also write the quantized model as a compressed-tensors checkpoint (transformers, vLLM) to "
                        "DIR: NVFP4, MXFP4, NVFP4A16, MXFP4A16 and W4A16_G128 configs; DIR may be given back as "
                        "--model_args pretrained=DIR")
    q.add_argument("--ignore", nargs="+", choices=["lm_head", "embedding", "none"], default=None,
                   help="modules left in full precision, replacing the config's choice (named formats: lm_head and "
                        "embedding, as llm-compressor; LLM-FP4: none); 'none' quantizes both")
    add_format_flags(p)
    add_flatquant_flags(p)
    return p


def add_format_flags(p):
    from quant_layers.blocks import MX_RULES
    from quant_layers.schemes import PRESETS
    f = p.add_argument_group(
        "named formats (--quant_config NVFP4_config, NVFP4_GPTQ_config, NVFP4_search_config, NVFP4_best_config, "
        "NVFP4A16_config, MXFP4_config, MXFP4_GPTQ_config, MXFP4_Hadamard_GPTQ_config, MXFP4_search_config, "
        "MXFP4_best_config, W4A16_G128_config)",
        "Block-scaled FP formats as compressed-tensors computes them, by round-to-nearest or GPTQ (--act_order, "
        "--percdamp), with LLM-FP4's output-error clip search (the *_search and *_best configs; --search_intervals, "
        "--search_strategy) and NVFP4's four over six as options.")
    f.add_argument("--format", choices=list(PRESETS), default=None, help="the format, replacing the config's")
    f.add_argument("--four_over_six", action="store_true", default=None,
                   help="NVFP4: each weight block maps its maximum to 6 or to 4, whichever gives the lower error")
    f.add_argument("--four_over_six_inputs", action="store_true", default=None,
                   help="NVFP4: each input block too, at run time (no compressed-tensors export: the engines' "
                        "kernels map every input block to 6)")
    f.add_argument("--hadamard", action="store_true", default=None,
                   help="rotate every quantized linear's inputs and weight by a Hadamard matrix of the block size")
    f.add_argument("--mx_rule", choices=list(MX_RULES), default=None,
                   help="E8M0 scale of a block maximum: even (compressed-tensors, default), floor (OCP), ceil")
    f.add_argument("--input_tensor_scale", choices=["static", "dynamic"], default=None,
                   help="NVFP4 inputs: FP32 tensor scale from calibration (static, default) or from each input")
    f.add_argument("--layer_errors", action="store_true", default=None,
                   help="report every linear's output error with quantized inputs, RTN's and the method's (the "
                        "search reports it anyway; else it costs two more Gram matrices per linear group)")


FLAT_SWITCHES = ("w_asym", "a_asym", "q_asym", "k_asym", "v_asym", "cali_trans", "add_diag", "lwc", "lac",
                 "direct_inv", "warmup", "gptq", "act_order")
FLAT_VALUES = {"w_bits": int, "a_bits": int, "q_bits": int, "k_bits": int, "v_bits": int, "w_groupsize": int,
               "q_groupsize": int, "k_groupsize": int, "v_groupsize": int, "epochs": int, "nsamples": int,
               "cali_bsz": int, "flat_lr": float, "diag_alpha": float, "percdamp": float}
# Every published FlatQuant script names the parts it learns; once one of these is given, the command line is
# read as the reference reads it: switches and Q/K/V bits left out take the reference's defaults (its
# --flat_lr 1e-5 excepted: every published script passes 5e-3, which stays).
FLAT_LEARNED_PARTS = ("cali_trans", "add_diag", "lwc", "lac")
FLAT_REFERENCE_DEFAULTS = {"q_bits": 16, "k_bits": 16, "v_bits": 16, **{name: False for name in FLAT_SWITCHES}}


FLAT_HELP = {
    "w_bits": "weight bits (overrides --qbits W)", "a_bits": "activation bits (overrides --qbits A)",
    "q_bits": "query bits (recipe 16)", "k_bits": "K-cache bits (recipe 4)", "v_bits": "V-cache bits (recipe 4)",
    "k_groupsize": "K-cache group along head_dim (-1: one per head); honoured, unlike the reference",
    "v_groupsize": "V-cache group along head_dim (-1: one per head)", "q_groupsize": "query group along head_dim",
    "w_groupsize": "weight groups of RTN/GPTQ (-1: per output row)",
    "epochs": "training epochs per block (recipe 15)", "nsamples": "calibration windows (recipe 128)",
    "cali_bsz": "windows per training step (recipe 4)", "flat_lr": "AdamW lr of transforms and scales; clipping 10x "
    "(recipe 5e-3)", "diag_alpha": "SmoothQuant alpha of the per-channel scale init (0.3)",
    "percdamp": "GPTQ damping, fraction of mean diag(H) (0.01)", "cali_trans": "train the transforms",
    "add_diag": "learn per-channel scales", "lwc": "learnable weight clipping", "lac": "learnable activation clipping",
    "direct_inv": "direct factors with float64 inverses instead of orthogonal x diagonal",
    "warmup": "16-step linear lr warmup", "gptq": "GPTQ instead of RTN for the weights", "act_order": "GPTQ act-order",
    "w_asym": "asymmetric weights", "a_asym": "asymmetric activations", "q_asym": "asymmetric queries",
    "k_asym": "asymmetric K cache", "v_asym": "asymmetric V cache"}


def add_flatquant_flags(p):
    f = p.add_argument_group(
        "FlatQuant (--quant_config FlatQuant_config_llama, FlatQuant_FP_config_llama, or for the block formats "
        "NVFP4_FlatQuant_config, NVFP4_FlatQuant_GPTQ_config, MXFP4_FlatQuant_config, which also take --format)",
        "The reference's flags with its meaning. Without --cali_trans/--add_diag/--lwc/--lac the config's published "
        "W4A4KV4 recipe applies and the other flags change it; once one of those four is given (as in every "
        "published script), switches and Q/K/V bits left out take the reference's defaults (off, 16 bits), so its "
        "scripts port by changing the entry point.")
    for name in FLAT_SWITCHES:
        f.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None, help=FLAT_HELP.get(name))
    for name, kind in FLAT_VALUES.items():
        f.add_argument(f"--{name}", type=kind, default=None, help=FLAT_HELP.get(name))
    f.add_argument("--weight_quantizer", choices=["rtn", "gptq", "fpq_search"], default=None,
                   help="after folding: round-to-nearest, GPTQ (= --gptq) or LLM-FP4's format/bias search")
    f.add_argument("--no_transform", action="store_true",
                   help="no transforms and nothing learned unless named: the plain RTN/GPTQ baseline")
    f.add_argument("--cali_dataset", dest="calib_dataset", default=argparse.SUPPRESS, help="alias of --calib_dataset")
    f.add_argument("--save_matrix", action="store_true", help="accepted: the matrices are always saved")
    f.add_argument("--reload_matrix", action="store_true", help="load every block's matrices, no training")
    f.add_argument("--matrix_path", default=None, help="matrix file, or a folder holding flat_matrices.safetensors")
    f.add_argument("--resume", action="store_true",
                   help="continue an interrupted calibration: keep the blocks already in the parameter (FPQ, MinMax) "
                        "or matrix (FlatQuant) file, calibrate the rest")
    f.add_argument("--deactive_amp", action="store_true", help="accepted: calibration always runs in float32")
    f.add_argument("--lm_eval", action="store_true", help="accepted: lm-eval runs whenever --tasks is given")


def flat_settings(args, config):
    """FlatSettings from the command line (see add_flatquant_flags)."""
    given = {name: getattr(args, name) for name in (*FLAT_SWITCHES, *FLAT_VALUES) if getattr(args, name) is not None}
    base = FLAT_REFERENCE_DEFAULTS if any(name in given for name in FLAT_LEARNED_PARTS) else {}
    if args.no_transform:  # the plain RTN / GPTQ baseline: nothing learned unless named
        base = {**base, "transform": False, **{name: False for name in FLAT_LEARNED_PARTS}}
    settings = {**base, **given}
    for name in ("w_bits", "a_bits"):
        settings.pop(name, None)
    if settings.pop("gptq", False):
        settings["weight_quantizer"] = "gptq"
    if args.weight_quantizer:
        settings["weight_quantizer"] = args.weight_quantizer
    return replace(config.flat, **settings)


def make_config(args):
    from configs import load_config
    from quant_layers.search import replace_settings
    from utils.cli_checks import FORMAT_FLAGS, quant_config_name
    config = load_config(quant_config_name(args))
    config = config if args.qbits is None else config.with_qbits(args.qbits)
    g1, g2, n = args.search_intervals or (None, None, None)  # checked by utils.cli_checks
    search = replace_settings(config.search, gamma_low=g1, gamma_high=g2, n_candidates=None if n is None else int(n),
                              rounds=args.search_round, grid=args.search_grid, strategy=args.search_strategy,
                              format_space=args.format_space, shift_rounding=args.shift_rounding,
                              act_search_tokens=args.act_search_tokens, seed=args.seed)
    changes = {"search": search,
               "feed_quantized": config.feed_quantized if args.feed_quantized is None else args.feed_quantized,
               "calib_attention": args.calib_attention or config.calib_attention}
    if args.preshift:
        changes["preshift"] = args.preshift
    if args.fp_numerics:
        changes["fp_numerics"] = args.fp_numerics
    if args.ignore:
        changes.update(quantize_lm_head="lm_head" not in args.ignore, quantize_embedding="embedding" not in args.ignore)
    if config.block is not None:
        given = {name: getattr(args, name) for name in (*FORMAT_FLAGS, "act_order", "percdamp")
                 if getattr(args, name) is not None}
        changes["block"] = replace(config.block, **given)
    if config.flat is not None:  # FlatQuant leaves the embedding table alone whatever --qbits says
        changes.update(flat=flat_settings(args, config), e_bits=16)
        if args.nsamples is None and args.calib_size is not None:
            changes["flat"] = replace(changes["flat"], nsamples=args.calib_size)
        changes.update({f"{k}_bits": getattr(args, f"{k}_bits") for k in "wa" if getattr(args, f"{k}_bits") is not None})
    return replace(config, **changes)


def resolve_device(requested):
    import torch
    from utils.cli_checks import device_name
    requested = device_name(requested)
    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but CUDA is not available; pass --device cpu")
    return requested


def check_param_output(args, config):
    """The parameter or matrix file calibration writes, checked before the model loads: found unwritable only
    after calibrating, the work would be lost. Calibration writes safetensors, never .pt."""
    from utils.methods import method_for
    if config is None or args.only_eval or args.reload_matrix:
        return
    flag = "--matrix_path" if args.matrix_path else "--ptq_param_path"
    given = args.matrix_path or args.ptq_param_path
    if given is None:
        check_output_folder("search_result", "the default parameter folder")
    else:  # the method says which file a given path means (FlatQuant takes a folder, too)
        check_output_file(method_for(config).resolve_path(Path(given)), flag, ".safetensors")


def output_folder(args, model_name):
    from utils.report import previous_results_model
    if args.output_path is None:
        return None
    folder = Path(args.output_path)
    folder = folder.parent if folder.suffix == ".json" else folder
    check_output_folder(folder, "--output_path")
    previous = previous_results_model(folder)
    if previous not in (None, model_name):
        raise UsageError(f"{folder / 'results.json'} holds results of another model ({previous}); "
                         "choose another --output_path")
    return folder


def run(args) -> dict:
    from utils.cli_checks import (check_arguments, check_param_file_settings, check_sequence_lengths,
                                  quantized_checkpoint)
    check_arguments(args)  # before anything is loaded: a bad flag costs nothing
    from utils.hub import hub_offline
    offline = hub_offline()  # before the hub libraries are imported: offline, hub names fail at once
    import torch
    from utils import data, distributed, evaluation, models, params
    from utils.report import check_finite_results, format_table, write_results

    model_args = models.parse_model_args(args.model_args)
    name, device = model_args["pretrained"], resolve_device(args.device)
    device = distributed.start_from_environment(device)  # under torchrun: one rank of data-parallel calibration
    checkpoint = quantized_checkpoint(args)  # a compressed-tensors folder: evaluated as it is
    config = None if args.fp_only or checkpoint else make_config(args)
    if config is not None and args.only_eval and Path(args.ptq_param_path or "").suffix == ".pt":
        config = reference_file_config(args, config)
    if config is not None:
        from utils.methods import method_for
        method = method_for(config)  # a config the method cannot run is refused before the model loads
        mode = "reload" if args.only_eval or args.reload_matrix else "calibrate"
        # and so is a calibration set that the data-parallel processes cannot share
        distributed.check_windows(method.calibration_windows(config, args.calib_size, mode))
        check_param_file_settings(args, config)
    folder = output_folder(args, name)
    check_param_output(args, config)
    if args.save_compressed:  # what cannot be exported, or where it cannot go, is refused before calibration
        from utils.export import check_export_target
        check_export_target(args.save_compressed, name, config)
    if args.plots:
        check_plots(args, config)
    if args.tasks:  # load every task's data first: a task that cannot be had fails before calibration
        from utils import lm_eval_tasks
        names = [t.strip() for t in args.tasks.split(",") if t.strip()]
        tasks = lm_eval_tasks.prepare_tasks(names, lm_eval_tasks.parse_task_data(args.task_data),
                                            args.include_path, offline)
    dtype = model_args.get("dtype", "auto")
    if dtype == "auto" and device == "cpu":
        dtype = "float32"  # half-precision matmuls are slow or missing on CPUs
    model, tokenizer = models.load_model(name, dtype, device, bool(model_args.get("use_accelerate", False)),
                                         args.offload, args.offload_folder)
    check_sequence_lengths(args, model.config, calibrating=config is not None and not args.only_eval)
    torch.manual_seed(args.seed)

    named_format = config is not None and config.block is not None  # --qbits does not apply to a named format
    label = config.name if config else "compressed-tensors" if checkpoint else "FP"
    result = {"model": name, "quant_config": label,
              **({"format": checkpoint.get("format")} if checkpoint else {}),
              "qbits": config.qbits if config and not named_format else None,
              **({"format": config.block.format} if named_format else {}), "settings": config.to_dict() if config else None}
    reference = figure_reference(args, config, model, tokenizer) if args.plots else None
    if config is not None:
        result.update(quantize_model(args, config, model, tokenizer, name))
    if not distributed.is_main():  # the other ranks helped calibrate; rank 0 holds the same model and reports
        return result
    if args.save_compressed:
        from utils.export import export
        result["compressed_checkpoint"] = str(export(model, args.save_compressed, tokenizer, config, model_name=name))
        print(f"compressed-tensors checkpoint written to {result['compressed_checkpoint']}")

    figures = None
    if reference is not None:
        from utils.figure_data import layer_figures
        figures = layer_figures(model, config, reference)
        del reference
    max_windows = args.ppl_limit if args.ppl_limit is not None else (
        int(args.limit) if args.limit and args.limit >= 1 else None)
    result["ppl"] = {}
    for dataset in args.eval_ppl:
        tokens = data.evaluation_tokens(tokenizer, dataset)
        result["ppl"][dataset] = evaluation.perplexity(model, tokens, args.ppl_seqlen, max_windows, desc=dataset)
    lm_eval_output = None
    if args.tasks:
        hflm_args = {k: v for k, v in model_args.items() if k not in ("pretrained", "use_accelerate", "dtype")}
        evaluated = lm_eval_tasks.evaluate_tasks(
            model, tokenizer, tasks, num_fewshot=args.num_fewshot, limit=args.limit, batch_size=args.batch_size,
            device=device, model_args=hflm_args, gen_kwargs=args.gen_kwargs, log_samples=args.log_samples)
        result["tasks"], result["paper_average"] = evaluated["summary"], evaluated["average"]
        result["evaluation_seconds"] = round(evaluated["seconds"], 2)
        lm_eval_output = evaluated["output"]
    result["versions"] = params.versions()
    check_finite_results(result)
    print(format_table(result))
    if folder is not None:
        write_results(folder, result, lm_eval_output)
        print(f"results written to {folder}/results.json")
    if figures is not None:
        write_figures(folder, figures, result)
    return result


def check_plots(args, config):
    """--plots needs a quantized run with an output folder, and matplotlib: say so before any work."""
    from utils.errors import UsageError
    from utils.plots import pyplot
    if config is None or args.output_path is None:
        raise UsageError("--plots draws a quantized run's figures into its results folder; pass --output_path and "
                         "drop --fp_only")
    if config.block is not None:
        raise UsageError(f"--plots draws the figures of LLM-FP4 and FlatQuant configs, not of the named format "
                         f"{config.block.format}; drop --plots")
    pyplot()


def figure_reference(args, config, model, tokenizer):
    """The full-precision side of the figures, on a few calibration windows, before calibration."""
    from utils import data
    from utils.figure_data import FIGURE_SEQLEN, FIGURE_WINDOWS, capture_reference
    samples = data.calibration_samples(tokenizer, args.calib_dataset, FIGURE_WINDOWS,
                                       min(args.calib_seqlen, FIGURE_SEQLEN), args.seed)
    return capture_reference(model, config, samples)


def write_figures(folder, figures, result):
    from utils.figure_data import run_caption, run_format_map, write_figure_data
    from utils.plots import redraw
    heat_map = run_format_map(result)  # rebuilt on every run: an earlier run's map may be in the folder
    write_figure_data(folder, {**figures, **({"format_map": heat_map} if heat_map else {})}, run_caption(result))
    for png in redraw(folder):
        print(f"figure written to {png}")


def reference_file_config(args, config):
    """A reference .pt file is evaluated as the reference code computes it (FP numerics and, for FPQ, the
    simulated pre-shift), unless --fp_numerics says otherwise; a folded pre-shift cannot hold its values."""
    from utils import params
    if args.preshift == "folded":
        raise UsageError("a reference .pt file holds the simulated pre-shift; drop --preshift folded")
    adjusted = params.config_for_reference_file(args.ptq_param_path, config, None if args.fp_numerics else "reference")
    print(f"reference parameter file: evaluating with fp_numerics={adjusted.fp_numerics}"
          + (", preshift=simulated" if adjusted.method == "fpq" else "")
          + (" (the reference code's clip 2 * 2^(2^E-1-b); --fp_numerics paper for the paper's)"
             if not args.fp_numerics else ""))
    return adjusted


def quantize_model(args, config, model, tokenizer, name) -> dict:
    """Calibrate with the config's method, writing its parameter file (or continue / reload one)."""
    from utils import data, models
    from utils.calibrate import quantize
    from utils.methods import ParamFile, method_for
    method = method_for(config)
    fingerprint = models.model_fingerprint(model)
    windows = method.calibration_windows(config, args.calib_size)
    calib_tag = f"{Path(args.calib_dataset).stem}{windows}x{args.calib_seqlen}s{args.seed}"
    given = args.matrix_path or args.ptq_param_path
    path = method.resolve_path(Path(given)) if given else method.default_path("search_result", config, name,
                                                                                fingerprint, calib_tag)
    mode = ("reload" if args.only_eval or args.reload_matrix else
            "resume" if args.resume or args.reuse_params else "calibrate")  # resume: an unfinished file continues
    reads = method.calibration_windows(config, args.calib_size, mode)
    calib = (data.calibration_samples(tokenizer, args.calib_dataset, reads, args.calib_seqlen, args.seed)
             if reads else None)
    extra = {"calibration": {"dataset": args.calib_dataset, "size": windows, "seqlen": args.calib_seqlen,
                             "seed": args.seed}}
    from utils.distributed import is_main
    report = quantize(model, config, calib, files=ParamFile(path, mode, name, fingerprint, extra),
                      release_originals=True, progress=is_main())
    print(f"quantization parameters: {report.param_path} ({'loaded' if report.loaded else mode})")
    return {"param_path": report.param_path, **({} if report.loaded else {"calibration": report.to_dict()})}


def stop_process_group():
    if "torch.distributed" in sys.modules:  # torch itself is not imported by runs refused early
        from utils.distributed import stop
        stop()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("no arguments: running the embedded default:\n  python main.py " + " ".join(EMBEDDED_DEFAULT))
        argv = EMBEDDED_DEFAULT
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)  # read once, when torch loads (below, in run)
    started = time.perf_counter()
    try:
        run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:  # Ctrl-C: what was saved and how to continue, no traceback
        print(f"interrupted: {str(interrupt) or 'Ctrl-C'}", file=sys.stderr)
        return 130
    finally:
        stop_process_group()
    print(f"total time {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
