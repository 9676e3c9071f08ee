"""Peak memory of layer-by-layer onloading from disk against the same calibration with the model in memory.

Writes a randomly initialised LLaMA-shaped model (hidden 4096, intermediate 11008, 32 heads, --blocks decoder blocks,
a small vocabulary; bf16 safetensors, one shard per block) to a temporary folder, then runs FPQ (one round, a few
search points) and FlatQuant (one epoch, a few steps) on random token ids, each once with the blocks on disk
(utils/onload.py, --offload disk) and once with the whole model in memory, every run in its own process so that
its peak resident set (the kernel's maxrss) is its own. A run loads the model, calibrates it with its parameter
(or matrix) file, hashes every block's quantized tensors and scores the perplexity of a few random windows.

Reported per method: peak RSS of each run, the model's size and one block's (in the calibration dtype), peak RSS /
model size, peak RSS minus one block, the disk run's peak / the in-memory run's, and whether the parameter file,
the blocks' quantized tensors and the perplexity are identical.

python benchmarks/onload.py [--blocks 6] [--dtype float32] [--methods fpq flatquant] [--calib 2x64] [--n 6]
Results: results/onload.json and results/onload.md (and on stdout).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from main import OMP_WAIT_POLICY  # noqa: E402

HIDDEN, INTERMEDIATE, HEADS, VOCAB = 4096, 11008, 32, 1024
BLOCK_SHAPES = {"self_attn.q_proj.weight": (HIDDEN, HIDDEN), "self_attn.k_proj.weight": (HIDDEN, HIDDEN),
                "self_attn.v_proj.weight": (HIDDEN, HIDDEN), "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN), "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
                "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE), "input_layernorm.weight": (HIDDEN,),
                "post_attention_layernorm.weight": (HIDDEN,)}


def write_model(folder: Path, blocks: int, seqlen: int):
    """Random bf16 weights, one safetensors shard per block (written one block at a time) plus the rest."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig
    LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=blocks,
                num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=max(seqlen, 128),
                tie_word_embeddings=False, dtype="bfloat16").save_pretrained(folder)
    generator = torch.Generator().manual_seed(0)

    def weight(shape):
        if len(shape) == 1:
            return 1 + 0.1 * torch.randn(shape, generator=generator).to(torch.bfloat16)
        return (torch.randn(shape, generator=generator) * shape[1] ** -0.5).to(torch.bfloat16)
    weight_map, shards = {}, blocks + 1
    for index in range(blocks):
        name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {f"model.layers.{index}.{key}": weight(shape) for key, shape in BLOCK_SHAPES.items()}
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    name = f"model-{shards:05d}-of-{shards:05d}.safetensors"
    tensors = {"model.embed_tokens.weight": weight((VOCAB, HIDDEN)), "lm_head.weight": weight((VOCAB, HIDDEN)),
               "model.norm.weight": weight((HIDDEN,))}
    save_file(tensors, str(folder / name), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(tensors, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def quant_config(args):
    from configs import load_config
    if args.method == "fpq":
        config = load_config("FPQ_config_llama")
        return replace(config, search=replace(config.search, rounds=1, n_candidates=args.n, strategy="coarse",
                                              act_search_tokens=args.act_search_tokens))
    config = load_config("FlatQuant_config_llama")
    count = int(args.calib.split("x")[0])
    return replace(config, flat=replace(config.flat, epochs=1, nsamples=count, cali_bsz=1))


def block_digests(model, scratch: Path | None) -> list[str]:
    """sha256 of each block's quantized weights and other checkpoint tensors (on disk: its scratch file)."""
    import torch
    from safetensors import safe_open
    digests = []
    for index, block in enumerate(model.model.layers):
        if scratch is None:
            tensors = {key: getattr(block.get_submodule(key.rpartition(".")[0]), key.rpartition(".")[2])
                       for key in BLOCK_SHAPES}
        else:
            with safe_open(str(scratch / f"block_{index}.safetensors"), "pt") as f:
                tensors = {key.replace(".quantized_weight", ".weight"): f.get_tensor(key) for key in f.keys()}
        digest = hashlib.sha256()
        for key in sorted(tensors):
            digest.update(key.encode() + tensors[key].contiguous().view(torch.uint8).numpy().tobytes())
        digests.append(digest.hexdigest()[:16])
    return digests


def run_one(args) -> dict:
    """Child process: load (blocks on disk or the whole model), calibrate, hash, score."""
    import torch
    from utils.calibrate import quantize
    from utils.evaluation import perplexity
    from utils.methods import ParamFile, method_for
    from utils.models import model_fingerprint
    from utils.onload import load_offloaded
    folder, work = Path(args.folder), Path(args.work)
    dtype = getattr(torch, args.dtype)
    started = time.perf_counter()
    scratch = work / f"scratch-{args.method}" if args.mode == "disk" else None
    if scratch is not None:
        model = load_offloaded(folder, dtype, "cpu", scratch)
    else:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval().requires_grad_(False)
    loaded = time.perf_counter() - started
    count, seqlen = (int(v) for v in args.calib.split("x"))
    generator = torch.Generator().manual_seed(0)
    calib = torch.randint(0, VOCAB, (count, seqlen), generator=generator)
    config = quant_config(args)
    path = method_for(config).resolve_path(work / f"{args.method}-{args.mode}.safetensors")
    report = quantize(model, config, calib, files=ParamFile(path, "calibrate", "random-llama", model_fingerprint(model)),
                      release_originals=True, progress=False)
    ppl = perplexity(model, torch.randint(0, VOCAB, (args.ppl_windows * seqlen,), generator=generator), seqlen,
                     progress=False)
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "load_seconds": loaded,
            "calibration_seconds": report.seconds, "total_seconds": time.perf_counter() - started, "ppl": ppl,
            "param_file_sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:16],
            "block_digests": block_digests(model, scratch)}


def run_child(args, method: str, mode: str, folder: Path, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--one", "--method", method, "--mode", mode, "--folder", str(folder),
           "--work", str(work), "--dtype", args.dtype, "--calib", args.calib, "--n", str(args.n),
           "--act_search_tokens", str(args.act_search_tokens), "--ppl_windows", str(args.ppl_windows)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    if out.returncode:
        raise SystemExit(f"{method} {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(results: dict) -> str:
    rows = ["| method | run | peak RSS MB | peak RSS / model size | peak RSS - one block, MB | disk / memory peak | "
            "calibration s | identical file, blocks, ppl |", "|---|---|---|---|---|---|---|---|"]
    model_mb, block_mb = results["model_mb"], results["block_mb"]
    for method, runs in results["methods"].items():
        for mode in ("memory", "disk"):
            run = runs[mode]
            same = "" if mode == "memory" else ", ".join(str(runs["identical"][k]) for k in ("file", "blocks", "ppl"))
            ratio = "" if mode == "memory" else f"{run['peak_rss_mb'] / runs['memory']['peak_rss_mb']:.3f}"
            rows.append(f"| {method} | {mode} | {run['peak_rss_mb']:.0f} | {run['peak_rss_mb'] / model_mb:.3f} | "
                        f"{run['peak_rss_mb'] - block_mb:.0f} | {ratio} | {run['calibration_seconds']:.1f} | {same} |")
    return (f"model: {results['blocks']} blocks, {model_mb:.0f} MB in {results['dtype']} ({results['checkpoint_mb']:.0f} MB "
            f"bf16 on disk), one block {block_mb:.0f} MB\n\n" + "\n".join(rows))


def main():
    os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)  # the children run as main.py does
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="calibration dtype (main.py's on CPU: float32); the checkpoint is bf16")
    p.add_argument("--methods", nargs="+", default=["fpq", "flatquant"], choices=["fpq", "flatquant"])
    p.add_argument("--calib", default="2x64", help="calibration windows x tokens")
    p.add_argument("--n", type=int, default=6, help="FPQ search grid steps (one round, coarse)")
    p.add_argument("--act_search_tokens", type=int, default=64)
    p.add_argument("--ppl_windows", type=int, default=2)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    for name in ("method", "mode", "folder", "work"):
        p.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return
    element = 4 if args.dtype == "float32" else 2
    block_params = sum(math.prod(shape) for shape in BLOCK_SHAPES.values())
    rest_params = 2 * VOCAB * HIDDEN + HIDDEN
    results = {"blocks": args.blocks, "dtype": args.dtype, "settings": vars(args),
               "block_mb": block_params * element / 2 ** 20,
               "model_mb": (args.blocks * block_params + rest_params) * element / 2 ** 20,
               "checkpoint_mb": (args.blocks * block_params + rest_params) * 2 / 2 ** 20, "methods": {}}
    with tempfile.TemporaryDirectory(prefix="onload-bench-") as temporary:
        folder, work = Path(temporary) / "model", Path(temporary) / "work"
        folder.mkdir()
        work.mkdir()
        write_model(folder, args.blocks, int(args.calib.split("x")[1]))
        for method in args.methods:
            runs = {mode: run_child(args, method, mode, folder, work) for mode in ("disk", "memory")}
            runs["identical"] = {"file": runs["disk"]["param_file_sha256"] == runs["memory"]["param_file_sha256"],
                                 "blocks": runs["disk"]["block_digests"] == runs["memory"]["block_digests"],
                                 "ppl": runs["disk"]["ppl"] == runs["memory"]["ppl"]}
            results["methods"][method] = runs
            print(method, json.dumps(runs), flush=True)
    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    (out / "onload.json").write_text(json.dumps(results, indent=2))
    (out / "onload.md").write_text(table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
