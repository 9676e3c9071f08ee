"""Calibration and inference cost, with ratios against baselines measured in the same run.

Parts (each in its own process so peak memory is its own):
  smollm2       full FPQ calibration of the offline SmolLM2-135M: seconds per block, total, peak memory
  llama7b_block one randomly initialised LLaMA-7B-shaped block (hidden 4096, intermediate 11008)
  flat_llama7b_block  FlatQuant W4A4KV4 training + folding + RTN of one random LLaMA-7B-shaped decoder block
  forward       forward time of the fake-quantized SmolLM2 relative to full precision
  generate      seconds per generated token (greedy, KV cache, fixed length) of the fake-quantized SmolLM2 relative to FP
  lm_eval       lm-eval wall time (GSM8K generation, cloze) of the fake-quantized SmolLM2 relative to FP
  block_cost    FPQ seconds per SmolLM2 block at a small and a large setting (--small, --large), under each OpenMP
                wait policy (--wait_policies): the small/large ratio shows the cost that does not shrink with the work

python benchmarks/calibration.py [--parts smollm2 llama7b_block flat_llama7b_block forward generate lm_eval block_cost]
       [--calib 32x512] [--n 100] [--flat_calib 4x512 --epochs 1] [--small 8x256,1,20 --large 32x512,3,100 --blocks 1]
Results: benchmarks/results/calibration.json and a table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from main import OMP_WAIT_POLICY  # noqa: E402


def fpq_config(args):
    from configs import load_config
    config = load_config("FPQ_config_llama")
    return replace(config, search=replace(config.search, n_candidates=args.n, rounds=args.rounds,
                                          strategy=args.strategy, act_search_tokens=args.act_search_tokens))


def part_smollm2(args) -> dict:
    from utils.calibrate import quantize
    from utils.data import calibration_samples
    from utils.models import OFFLINE_MODEL, load_model
    model, tokenizer = load_model(OFFLINE_MODEL, "float32", args.device)
    count, seqlen = (int(v) for v in args.calib.split("x"))
    calib = calibration_samples(tokenizer, "enwiki", count, seqlen)
    report = quantize(model, fpq_config(args), calib, release_originals=True)  # as main.py
    return {"seconds": report.seconds, "seconds_per_block": sum(report.block_seconds) / len(report.block_seconds),
            "peak_memory_mb": report.peak_memory_mb}


def part_llama7b_block(args) -> dict:
    import torch
    from quant_layers import QuantLinear
    from utils.calibrate import PeakMemory, calibrate_linear
    torch.manual_seed(0)
    count, seqlen = (int(v) for v in args.calib.split("x"))
    tokens = min(count * seqlen, args.block_tokens)
    config, started = fpq_config(args), time.perf_counter()
    shapes = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
              "gate_proj": (4096, 11008), "up_proj": (4096, 11008), "down_proj": (11008, 4096)}
    seconds = {}
    with PeakMemory(torch.device(args.device)) as memory:
        for name, (inp, out) in shapes.items():
            layer_start = time.perf_counter()
            x = torch.randn(tokens, inp, device=args.device)
            x[:, :8] *= 30  # outlier channels
            layer = QuantLinear(torch.nn.Linear(inp, out, bias=False, device=args.device))
            calibrate_linear(layer, x, config)
            del x, layer
            seconds[name] = time.perf_counter() - layer_start
    return {"tokens": tokens, "seconds": time.perf_counter() - started, "seconds_per_linear": seconds,
            "peak_memory_mb": memory.peak_mb}


def part_flat_llama7b_block(args) -> dict:
    """One LLaMA-7B-shaped decoder block (random weights) through FlatQuant: seconds and peak memory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from configs import load_config
    from utils.flatquant import flat_quantize
    torch.manual_seed(0)
    count, seqlen = (int(v) for v in args.flat_calib.split("x"))
    cfg = LlamaConfig(vocab_size=1024, hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=seqlen)
    model = LlamaForCausalLM(cfg).to(args.device).eval().requires_grad_(False)
    config = load_config("FlatQuant_config_llama")
    config = replace(config, flat=replace(config.flat, epochs=args.epochs, nsamples=count))
    ids = torch.randint(0, cfg.vocab_size, (count, seqlen))
    report = flat_quantize(model, config, ids.to(args.device), progress=False)
    return {"samples": count, "seqlen": seqlen, "epochs": args.epochs, "seconds": report.seconds,
            "peak_memory_mb": report.peak_memory_mb, "device": args.device}


def quickly_quantized_smollm2(args):
    """SmolLM2 with FPQ W4A4E4 quantizers from a tiny search: the search quality does not change the cost
    of running the model. Its full-precision weights are kept, so FP and fake-quant run in one process."""
    from utils.calibrate import quantize
    from utils.data import calibration_samples
    from utils.models import OFFLINE_MODEL, load_model
    model, tokenizer = load_model(OFFLINE_MODEL, "float32", args.device)
    calib = calibration_samples(tokenizer, "enwiki", 2, 64)
    quick = replace(fpq_config(args), search=replace(fpq_config(args).search, n_candidates=4, rounds=1))
    quantize(model, quick, calib, progress=False)
    return model, tokenizer


def part_forward(args) -> dict:
    import torch
    from utils.calibrate import set_quantized
    from utils.data import calibration_samples
    model, tokenizer = quickly_quantized_smollm2(args)
    ids = calibration_samples(tokenizer, "enwiki", 4, 512, seed=1).to(args.device)

    def timed(quantized):
        set_quantized(model, quantized)
        with torch.no_grad():
            model(ids[:1])
            started = time.perf_counter()
            for _ in range(3):
                model(ids)
        return (time.perf_counter() - started) / 3

    fp, fq = timed(False), timed(True)
    return {"fp_seconds": fp, "fake_quant_seconds": fq, "ratio": fq / fp}


def part_generate(args) -> dict:
    """Greedy generation with the KV cache, a fixed number of new tokens (so a model whose answers run longer
    is not charged for them): seconds per new token of the fake-quantized model relative to full precision.
    FP and fake-quant alternate; each keeps its fastest of --repeats runs."""
    import torch
    from utils.calibrate import set_quantized
    from utils.data import calibration_samples
    model, tokenizer = quickly_quantized_smollm2(args)
    prompt = calibration_samples(tokenizer, "enwiki", 1, args.prompt_tokens, seed=2).to(args.device)
    best = {False: float("inf"), True: float("inf")}
    with torch.no_grad():
        for _ in range(args.repeats):
            for quantized in (False, True):
                set_quantized(model, quantized)
                started = time.perf_counter()
                model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                               do_sample=False, pad_token_id=tokenizer.eos_token_id)
                best[quantized] = min(best[quantized], (time.perf_counter() - started) / args.new_tokens)
    return {"fp_seconds_per_token": best[False], "fake_quant_seconds_per_token": best[True],
            "ratio": best[True] / best[False], "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens}


def part_lm_eval(args) -> dict:
    """Wall time of lm-eval (GSM8K CoT generation with the KV cache, and the Wikipedia cloze task) on the
    fake-quantized model relative to full precision; for GSM8K also per generated token, since a 4-bit model's
    answers often run longer (up to lm-eval's token limit) than the FP model's."""
    from utils import lm_eval_tasks
    from utils.calibrate import set_quantized
    model, tokenizer = quickly_quantized_smollm2(args)
    data = lm_eval_tasks.parse_task_data(["gsm8k_cot=gsm8k-test"])
    result = {}
    for task, limit in (("gsm8k_cot", args.eval_limit), ("enwiki_cloze", 10 * args.eval_limit)):
        prepared = lm_eval_tasks.prepare_tasks([task], data)
        for quantized in (False, True):
            set_quantized(model, quantized)
            run = lm_eval_tasks.evaluate_tasks(model, tokenizer, prepared, limit=limit, device=args.device,
                                               log_samples=True)
            key = "fake_quant" if quantized else "fp"
            result[f"{task}_{key}_seconds"] = run["seconds"]
            result[f"{task}_{key}_metrics"] = run["summary"]
            if task == "gsm8k_cot":
                answers = [s["resps"][0][0] for samples in run["output"]["samples"].values() for s in samples]
                result[f"{task}_{key}_generated_tokens"] = sum(len(tokenizer(a).input_ids) for a in answers)
        result[f"{task}_ratio"] = result[f"{task}_fake_quant_seconds"] / result[f"{task}_fp_seconds"]
    per_token = {key: result[f"gsm8k_cot_{key}_seconds"] / max(result[f"gsm8k_cot_{key}_generated_tokens"], 1)
                 for key in ("fp", "fake_quant")}
    result["gsm8k_cot_ratio_per_generated_token"] = per_token["fake_quant"] / per_token["fp"]
    return result


def part_block_seconds(args) -> dict:
    """Seconds of each of the first --blocks SmolLM2 blocks, FPQ at --calib, --rounds, --n (one child per setting)."""
    from utils.calibrate import quantize
    from utils.data import calibration_samples
    from utils.models import OFFLINE_MODEL, load_model
    model, tokenizer = load_model(OFFLINE_MODEL, "float32", args.device)
    model.model.layers = model.model.layers[:args.blocks]  # the blocks to time; lm_head then sees their output
    count, seqlen = (int(v) for v in args.calib.split("x"))
    config = replace(fpq_config(args), quantize_embedding=False, quantize_lm_head=False)  # blocks only
    report = quantize(model, config, calibration_samples(tokenizer, "enwiki", count, seqlen), progress=False)
    return {"block_seconds": report.block_seconds}


def part_block_cost(args) -> dict:
    """Seconds per block at the small and the large setting, each in a child process under each wait policy."""
    result = {}
    for policy in args.wait_policies:
        for label, setting in (("small", args.small), ("large", args.large)):
            calib, rounds, n = setting.split(",")
            seconds = run_part("block_seconds", ["--calib", calib, "--rounds", rounds, "--n", n, "--blocks",
                                                 str(args.blocks), *setting_flags(args)], {"OMP_WAIT_POLICY": policy})
            result[f"{label}_{policy}"] = sum(seconds["block_seconds"]) / args.blocks
        result[f"ratio_small_over_large_{policy}"] = result[f"small_{policy}"] / result[f"large_{policy}"]
    return result


def setting_flags(args) -> list[str]:
    return ["--strategy", args.strategy, "--act_search_tokens", str(args.act_search_tokens), "--device", args.device]


def run_part(part: str, argv: list[str], env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--one", part, *argv]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, **(env or {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


PARTS = {"smollm2": part_smollm2, "llama7b_block": part_llama7b_block, "flat_llama7b_block": part_flat_llama7b_block,
         "forward": part_forward, "generate": part_generate, "lm_eval": part_lm_eval, "block_cost": part_block_cost,
         "block_seconds": part_block_seconds}


def main():
    os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)  # the children run as main.py does
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="*", default=[p for p in PARTS if p != "block_seconds"], choices=list(PARTS))
    p.add_argument("--output", default="calibration.json", help="file name under benchmarks/results/")
    p.add_argument("--calib", default="32x512")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--strategy", default="coarse", choices=["full", "coarse"])
    p.add_argument("--act_search_tokens", type=int, default=512)
    p.add_argument("--block_tokens", type=int, default=2048, help="calibration tokens of the 7B-shaped block")
    p.add_argument("--flat_calib", default="4x512", help="FlatQuant windows x tokens of the 7B-shaped block")
    p.add_argument("--epochs", type=int, default=1, help="FlatQuant epochs of the 7B-shaped block")
    p.add_argument("--prompt_tokens", type=int, default=128, help="generate: prompt length")
    p.add_argument("--new_tokens", type=int, default=64, help="generate: new tokens per run")
    p.add_argument("--repeats", type=int, default=3, help="generate: runs of each model (the fastest kept)")
    p.add_argument("--eval_limit", type=int, default=10, help="GSM8K problems (x10 cloze items) for lm_eval")
    p.add_argument("--small", default="8x256,1,20", help="block_cost: windows x tokens,rounds,n of the small setting")
    p.add_argument("--large", default="32x512,3,100", help="block_cost: the same for the large setting")
    p.add_argument("--blocks", type=int, default=1, help="block_cost: blocks timed per setting")
    p.add_argument("--wait_policies", nargs="+", default=["ACTIVE", "PASSIVE"], choices=["ACTIVE", "PASSIVE"],
                   help="block_cost: the children's OMP_WAIT_POLICY (ACTIVE: OpenMP's default, before main.py set one)")
    p.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:  # child process: run one part, print its JSON
        print(json.dumps(PARTS[args.one](args)))
        return
    results = {"settings": vars(args)}
    for part in args.parts:
        results[part] = run_part(part, [a for a in sys.argv[1:] if a != "--parts" and a not in PARTS])
        print(part, json.dumps(results[part]))
    folder = ROOT / "benchmarks" / "results"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / args.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
