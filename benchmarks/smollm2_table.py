"""The README's SmolLM2-135M tables, calibrated on offline Wikipedia; perplexity on held-out Wikipedia and ABC news.

--table llmfp4: FP32, MinMax INT, MinMax FP, FPQ baseline, FPQ simulated, FPQ folded at W4A4E4 (32 x 512 tokens).
--table flatquant: FP32, RTN, FlatQuant + RTN / GPTQ (one set of trained INT matrices), FlatQuant FP4 + the FPQ
weight search, at W4A4KV4 (32 x 512 tokens, 3 epochs instead of the paper's 128 x 2048 and 15, for CPU time).

python benchmarks/smollm2_table.py [--table llmfp4|flatquant] [--rerun | --no_run] [--rows NAME ...]   runs what
is missing under results/<table>/ (or, with --rerun, the named rows again), then prints the table and writes
results/<table>/table.json and table.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
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
}


def command(table: str, name: str) -> list[str]:
    folder, common, rows = TABLES[table]
    return [sys.executable, "main.py", *common.split(), "--output_path", f"results/{folder}/{name}",
            *rows[name][1].split()]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", choices=list(TABLES), default="llmfp4")
    p.add_argument("--rerun", action="store_true", help="run every row again")
    p.add_argument("--no_run", action="store_true", help="only tabulate the rows that have results")
    p.add_argument("--rows", nargs="*", default=None, help="rows to (re)run (default: all of the table)")
    args = p.parse_args()
    folder, _, rows = TABLES[args.table]
    unknown = set(args.rows or ()) - set(rows)
    if unknown:
        p.error(f"unknown rows {sorted(unknown)} for --table {args.table}; choose from {list(rows)}")
    table = []
    for name, (label, _) in rows.items():
        result_file = ROOT / "results" / folder / name / "results.json"
        if name in (args.rows or rows) and (args.rerun or not result_file.exists()):
            if args.no_run:
                continue
            subprocess.run(command(args.table, name), cwd=ROOT, check=True)
        if not result_file.exists():
            continue
        result = json.loads(result_file.read_text())
        calibration = result.get("calibration") or {}
        blocks = calibration.get("block_seconds") or [None]
        table.append({"method": label, **{f"ppl {k}": v for k, v in result["ppl"].items()},
                      "calibration s": calibration.get("seconds"),
                      "s per block": None if blocks[0] is None else sum(blocks) / len(blocks),
                      "peak MB": calibration.get("peak_memory_mb"),
                      "command": "python " + " ".join(command(args.table, name)[1:])})
    if not table:
        print(f"no results under results/{folder}/ yet")
        return
    columns = [c for c in table[0] if c != "command"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in table:
        cells = [row[c] if isinstance(row[c], str) else ("-" if row[c] is None else f"{row[c]:.2f}") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    (ROOT / "results" / folder / "table.md").write_text(text + "\n")
    (ROOT / "results" / folder / "table.json").write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
