"""The README's SmolLM2-135M tables, calibrated on offline Wikipedia; perplexity on held-out Wikipedia and ABC news.

--table llmfp4: FP32, MinMax INT, MinMax FP, FPQ baseline, FPQ simulated, FPQ folded at W4A4E4 (32 x 512 tokens).
--table flatquant: FP32, RTN, FlatQuant + RTN / GPTQ (one set of trained INT matrices), FlatQuant FP4 + the FPQ
weight search, at W4A4KV4 (32 x 512 tokens, 3 epochs instead of the paper's 128 x 2048 and 15, for CPU time).
--table blocks: block-scaled FP4 (NVFP4, MXFP4, NVFP4A16) by RTN, GPTQ and the LLM-FP4 search, next to
llm-compressor's rows on the same tokens (its environment: README, "llm-compressor side by side"); W4A4 or W4A16
on every decoder linear, embedding and lm_head in full precision on both sides (llm-compressor's default).

python benchmarks/smollm2_table.py [--table llmfp4|flatquant|blocks] [--rerun | --no_run] [--rows NAME ...]
[--peer_venv DIR]   runs what is missing under results/<table>/ (or, with --rerun, the named rows again), then
prints the table and writes results/<table>/table.json and table.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EVAL = "--model_args pretrained=smollm2-135m-offline --device cpu --calib_dataset enwiki --calib_seqlen 512 " \
       "--eval_ppl enwiki-heldout abcnews --ppl_seqlen 512 --ppl_limit 40 "
SEARCH = "--search_round 3 --search_intervals 0.01 1.2 100 --search_strategy coarse "
FPQ = "--calib_size 32 " + SEARCH + "--act_search_tokens 512 --quant_config "  # the search configs' rows
KV4 = "--w_bits 4 --a_bits 4 --k_bits 4 --k_asym --v_bits 4 --v_asym --nsamples 32 "
FLAT = "--quant_config FlatQuant_config_llama " + KV4 + "--cali_bsz 4 --epochs 3 --flat_lr 5e-3 --lwc --lac --cali_trans --add_diag "
TABLES = {  # table -> (folder, settings shared by every row, {row: (label, its own settings)})
    "llmfp4": ("table", EVAL, {  # main.py refuses flags a row would ignore: the search flags only where searched
        "fp32": ("FP32", "--fp_only"),
        "minmax_int": ("MinMax INT", "--calib_size 32 --quant_config MinMax_INT_config_llama"),
        "minmax_fp": ("MinMax FP (E2M1)", "--calib_size 32 --quant_config MinMax_config_llama"),
        "fpq_baseline": ("FPQ baseline", FPQ + "FPQ_baseline_config_llama"),
        "fpq_simulated": ("FPQ, pre-shift simulated", FPQ + "FPQ_simulated_config_llama"),
        "fpq_folded": ("FPQ, pre-shift folded", FPQ + "FPQ_config_llama")}),
    "flatquant": ("flatquant_table", EVAL, {
        "fp32": ("FP32", "--fp_only"),
        "rtn": ("RTN (no transforms)", "--quant_config FlatQuant_config_llama " + KV4 + "--no_transform"),
        "flat_rtn": ("FlatQuant + RTN", FLAT),
        "flat_gptq": ("FlatQuant + GPTQ (same matrices)", FLAT + "--gptq --reload_matrix"),
        "flat_fp4": ("FlatQuant FP4 (E2M1) + FPQ weight search",
                     FLAT.replace("FlatQuant_config_llama", "FlatQuant_FP_config_llama") + SEARCH)}),
    "blocks": ("blocks_table", EVAL, {
        "fp32": ("FP32", "--fp_only"),
        "nvfp4_rtn": ("NVFP4 RTN", "--calib_size 32 --quant_config NVFP4_config"),
        "nvfp4_gptq": ("NVFP4 GPTQ", "--calib_size 32 --quant_config NVFP4_GPTQ_config"),
        "nvfp4_search": ("NVFP4 LLM-FP4 search", "--calib_size 32 --search_strategy coarse --quant_config NVFP4_search_config"),
        "nvfp4_best": ("NVFP4 search + 4/6 + GPTQ", "--calib_size 32 --search_strategy coarse --quant_config NVFP4_best_config"),
        "nvfp4_gptq_in46": ("NVFP4 GPTQ, inputs 4/6", "--calib_size 32 --quant_config NVFP4_GPTQ_config --four_over_six_inputs"),
        "nvfp4_best_in46": ("NVFP4 search + 4/6 + GPTQ, inputs 4/6", "--calib_size 32 --search_strategy coarse "
                            "--quant_config NVFP4_best_config --four_over_six_inputs"),
        "mxfp4_rtn": ("MXFP4 RTN", "--calib_size 32 --quant_config MXFP4_config"),
        "mxfp4_gptq": ("MXFP4 GPTQ", "--calib_size 32 --quant_config MXFP4_GPTQ_config"),
        "mxfp4_hadamard_gptq": ("MXFP4 Hadamard + GPTQ", "--calib_size 32 --quant_config MXFP4_Hadamard_GPTQ_config"),
        "mxfp4_search": ("MXFP4 LLM-FP4 search", "--calib_size 32 --search_strategy coarse --quant_config MXFP4_search_config"),
        "mxfp4_best": ("MXFP4 search + GPTQ", "--calib_size 32 --search_strategy coarse --quant_config MXFP4_best_config"),
        "nvfp4a16_rtn": ("NVFP4A16 (W4A16) RTN", "--calib_size 32 --quant_config NVFP4A16_config")}),
}
PEER_ROWS = {  # table -> {row: (label, llm-compressor scheme, method, our row it is compared with)}
    "blocks": {"peer_fp32": ("llm-compressor FP32", "FP32", None, "fp32"),
               "peer_nvfp4_rtn": ("llm-compressor NVFP4 RTN", "NVFP4", "rtn", "nvfp4_rtn"),
               "peer_nvfp4_gptq": ("llm-compressor NVFP4 GPTQ", "NVFP4", "gptq", "nvfp4_gptq"),
               "peer_mxfp4_rtn": ("llm-compressor MXFP4 RTN", "MXFP4", "rtn", "mxfp4_rtn"),
               "peer_mxfp4_gptq": ("llm-compressor MXFP4 GPTQ", "MXFP4", "gptq", "mxfp4_gptq"),
               "peer_nvfp4a16_rtn": ("llm-compressor NVFP4A16 RTN", "NVFP4A16", "rtn", "nvfp4a16_rtn")}}
PEER_VENV = os.environ.get("PEER_VENV", ".venv-peer")  # llm-compressor's environment, relative to the repository
TOKENS = "tokens.safetensors"  # the peer's calibration and perplexity windows, in the table's folder


def command(table: str, name: str) -> list[str]:
    folder, common, rows = TABLES[table]
    return [sys.executable, "main.py", *common.split(), "--output_path", f"results/{folder}/{name}",
            *rows[name][1].split()]


def peer_python(venv: str) -> Path:
    return (ROOT / venv / "bin" / "python").absolute()


def peer_command(table: str, name: str, venv: str) -> list[str]:
    """llm-compressor's row: the peer script under the peer environment's python, on the table's token file;
    it also saves the compressed checkpoint next to its results."""
    folder, _, scheme, method = TABLES[table][0], *PEER_ROWS[table][name][:3]
    out = f"results/{folder}/{name}"
    return [str(peer_python(venv)), "benchmarks/peer_llmcompressor.py", "--model", model_folder(our_settings(table)),
            "--tokens", f"results/{folder}/{TOKENS}", "--scheme", scheme, "--output", f"{out}/results.json",
            *(["--method", method, "--save_dir", f"{out}/checkpoint", "--skip_ppl"] if method else [])]


def checkpoint_eval_command(table: str, name: str) -> list[str]:
    """main.py scoring llm-compressor's checkpoint on the table's windows: its packed weights decoded exactly, its
    inputs quantized as its config states (on a CPU compressed-tensors' own forward takes minutes per window)."""
    folder, _, rows = TABLES[table]
    eval_flags = EVAL.split()
    for flag in ("--calib_dataset", "--calib_seqlen"):  # nothing is calibrated: the checkpoint is read as it is
        at = eval_flags.index(flag)
        del eval_flags[at:at + 2]
    eval_flags[eval_flags.index("--model_args") + 1] = f"pretrained=results/{folder}/{name}/checkpoint"
    return [sys.executable, "main.py", *eval_flags, "--output_path", f"results/{folder}/{name}/eval"]


def our_settings(table: str):
    """main.py's parsed arguments of the table's quantized rows: the calibration and perplexity settings that
    the peer's token file must reproduce."""
    import main
    name = next(row for row, (_, settings) in TABLES[table][2].items() if "--fp_only" not in settings)
    return main.build_parser().parse_args(command(table, name)[2:])


def model_folder(args) -> str:
    """The folder (or hub id) that main.py loads for these parsed arguments."""
    from utils.models import OFFLINE_MODELS, offline_model_folder, parse_model_args
    name = parse_model_args(args.model_args)["pretrained"]
    return offline_model_folder(name) if name in OFFLINE_MODELS else name


def write_peer_tokens(path: Path, args):
    """The calibration windows and the perplexity windows that main.py uses with these parsed arguments,
    made by the same functions: "calibration" [calib_size, calib_seqlen], "ppl/<dataset>" [windows, ppl_seqlen]."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer
    from utils.data import calibration_samples, evaluation_tokens
    from utils.evaluation import perplexity_windows
    from utils.files import atomic_write
    tokenizer = AutoTokenizer.from_pretrained(model_folder(args))
    tensors = {"calibration": calibration_samples(tokenizer, args.calib_dataset, args.calib_size, args.calib_seqlen,
                                                  args.seed)}
    for dataset in args.eval_ppl:
        tensors[f"ppl/{dataset}"] = perplexity_windows(evaluation_tokens(tokenizer, dataset), args.ppl_seqlen,
                                                       args.ppl_limit).contiguous()
    atomic_write(path, lambda temporary: save_file(tensors, str(temporary),
                                                   metadata={"ppl_datasets": json.dumps(args.eval_ppl)}))


def run_missing(args, folder: str, rows: dict, peers: dict):
    """Run the chosen rows that have no results (all chosen rows with --rerun); the token file first when a
    peer row runs, so both sides read the same windows; then score the peer checkpoints that have no perplexity."""
    chosen = [name for name in [*rows, *peers] if name in (args.rows or [*rows, *peers])]
    missing = [name for name in chosen if args.rerun or not (ROOT / "results" / folder / name / "results.json").exists()]
    if args.no_run:
        return
    if any(name in peers for name in missing):
        if not peer_python(args.peer_venv).exists():
            sys.exit(f"error: llm-compressor's environment {args.peer_venv} has no bin/python; create it as the "
                     "README says (or pass --peer_venv DIR, or set PEER_VENV)")
        write_peer_tokens(ROOT / "results" / folder / TOKENS, our_settings(args.table))
    for name in missing:
        runner = peer_command(args.table, name, args.peer_venv) if name in peers else command(args.table, name)
        subprocess.run(runner, cwd=ROOT, check=True)
    for name in chosen:  # a peer checkpoint saved but not yet scored (or scored again with --rerun)
        if name in peers and peers[name][2] and (args.rerun or read_peer_row(folder, name) is None):
            subprocess.run(checkpoint_eval_command(args.table, name), cwd=ROOT, check=True)


def read_peer_row(folder: str, name: str) -> dict | None:
    """The peer's results, with the perplexities of its checkpoint's evaluation when it skipped its own."""
    result = read_row(folder, name)
    scored = read_row(folder, f"{name}/eval")
    if result is not None and "ppl" not in result:
        return None if scored is None else {**result, "ppl": scored["ppl"]}
    return result


def read_row(folder: str, name: str) -> dict | None:
    result_file = ROOT / "results" / folder / name / "results.json"
    return json.loads(result_file.read_text()) if result_file.exists() else None


def cost_columns(result: dict) -> dict:
    calibration = result.get("calibration") or {}
    return {"calibration s": calibration.get("seconds"), "peak MB": calibration.get("peak_memory_mb")}


def plain_table(args, folder: str, rows: dict) -> list[dict]:
    table = []
    for name, (label, _) in rows.items():
        result = read_row(folder, name)
        if result is None:
            continue
        blocks = (result.get("calibration") or {}).get("block_seconds") or [None]
        costs = cost_columns(result)
        table.append({"method": label, **{f"ppl {k}": v for k, v in result["ppl"].items()},
                      "calibration s": costs["calibration s"],
                      "s per block": None if blocks[0] is None else sum(blocks) / len(blocks),
                      "peak MB": costs["peak MB"],
                      "command": "python " + " ".join(command(args.table, name)[1:])})
    return table


def blocks_table(args, folder: str, rows: dict, peers: dict) -> list[dict]:
    """Each of our rows followed by llm-compressor's matching row: perplexity, its gap to FP32 (our FP32 row,
    else the peer's), the ratio of our perplexity to the peer's, calibration seconds and peak memory, and the ratio
    of our calibration seconds to the peer's (comparable when both rows ran in one invocation, one after the
    other, on an otherwise idle machine)."""
    ours = {name: read_row(folder, name) for name in rows}
    theirs = {name: read_peer_row(folder, name) for name in peers}
    fp32 = ours["fp32"] or theirs["peer_fp32"]
    datasets = our_settings(args.table).eval_ppl
    entries = []
    for name, (label, _) in rows.items():
        match = next((theirs[peer] for peer, spec in peers.items() if spec[3] == name), None)
        entries.append((label, ours[name], match, "python " + " ".join(command(args.table, name)[1:])))
        entries += [(spec[0], theirs[peer], None, " ".join(peer_command(args.table, peer, args.peer_venv)))
                    for peer, spec in peers.items() if spec[3] == name]
    table = []
    for label, result, peer, shown in entries:
        if result is None:
            continue
        row = {"method": label}
        for dataset in datasets:
            ppl = result["ppl"][dataset]
            row[f"ppl {dataset}"] = ppl
            row[f"gap {dataset}"] = None if fp32 is None else ppl - fp32["ppl"][dataset]
            row[f"ours/peer {dataset}"] = None if peer is None else ppl / peer["ppl"][dataset]
        costs = cost_columns(result)
        theirs_s = None if peer is None else cost_columns(peer)["calibration s"]
        costs["ours/peer calibration s"] = None if not (theirs_s and costs["calibration s"]) else \
            costs["calibration s"] / theirs_s
        table.append({**row, **costs, "command": shown})
    return table


def write_table(folder: str, table: list[dict], note: str):
    columns = [c for c in table[0] if c != "command"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in table:
        cells = [row[c] if isinstance(row[c], str) else ("-" if row[c] is None else f"{row[c]:.2f}") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + (f"\n\n{note}" if note else "")
    print(text)
    (ROOT / "results" / folder / "table.md").write_text(text + "\n")
    (ROOT / "results" / folder / "table.json").write_text(json.dumps(table, indent=2))


BLOCKS_NOTE = ("Quantized: every decoder linear (W4A4, or W4A16 for NVFP4A16); embedding and lm_head stay full "
               "precision in every row, ours and llm-compressor's (its default ignore=['lm_head']). gap = ppl - FP32 "
               "ppl; ours/peer = our perplexity / llm-compressor's on the same scheme and method. llm-compressor's "
               "quantized rows: its oneshot calibration and saved checkpoint, scored by main.py reading that "
               "checkpoint (weights decoded bit for bit, inputs quantized as its config states).")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", choices=list(TABLES), default="llmfp4")
    p.add_argument("--rerun", action="store_true", help="run every row again")
    p.add_argument("--no_run", action="store_true", help="only tabulate the rows that have results")
    p.add_argument("--rows", nargs="*", default=None, help="rows to (re)run (default: all of the table)")
    p.add_argument("--peer_venv", default=PEER_VENV,
                   help="llm-compressor's virtual environment, for the blocks table's peer rows (default: "
                        "$PEER_VENV or .venv-peer in the repository)")
    args = p.parse_args()
    folder, _, rows = TABLES[args.table]
    peers = PEER_ROWS.get(args.table, {})
    unknown = set(args.rows or ()) - set(rows) - set(peers)
    if unknown:
        p.error(f"unknown rows {sorted(unknown)} for --table {args.table}; choose from {[*rows, *peers]}")
    run_missing(args, folder, rows, peers)
    table = blocks_table(args, folder, rows, peers) if peers else plain_table(args, folder, rows)
    if not table:
        print(f"no results under results/{folder}/ yet")
        return
    write_table(folder, table, BLOCKS_NOTE if peers else "")


if __name__ == "__main__":
    main()
