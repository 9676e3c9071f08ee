"""The README's SmolLM2-135M table: FP32, MinMax INT, MinMax FP, FPQ baseline, FPQ simulated, FPQ folded at
W4A4E4, calibrated on 32 x 512 tokens of offline Wikipedia; perplexity on held-out Wikipedia and ABC news.

python benchmarks/smollm2_table.py [--rerun | --no_run] [--rows NAME ...]   runs what is missing under
results/table/ (or, with --rerun, the named rows again), then prints the table and writes
results/table/table.json and table.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = ("--model_args pretrained=smollm2-135m-offline --device cpu --calib_dataset enwiki --calib_size 32 "
          "--calib_seqlen 512 --search_round 3 --search_intervals 0.01 1.2 100 --search_strategy coarse "
          "--act_search_tokens 512 --eval_ppl enwiki-heldout abcnews --ppl_seqlen 512 --limit 40").split()
ROWS = {"fp32": ("FP32", ["--fp_only"]),
        "minmax_int": ("MinMax INT", ["--quant_config", "MinMax_INT_config_llama"]),
        "minmax_fp": ("MinMax FP (E2M1)", ["--quant_config", "MinMax_config_llama"]),
        "fpq_baseline": ("FPQ baseline", ["--quant_config", "FPQ_baseline_config_llama"]),
        "fpq_simulated": ("FPQ, pre-shift simulated", ["--quant_config", "FPQ_simulated_config_llama"]),
        "fpq_folded": ("FPQ, pre-shift folded", ["--quant_config", "FPQ_config_llama"])}


def command(name: str) -> list[str]:
    return [sys.executable, "main.py", *COMMON, "--output_path", f"results/table/{name}", *ROWS[name][1]]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rerun", action="store_true", help="run every row again")
    p.add_argument("--no_run", action="store_true", help="only tabulate the rows that have results")
    p.add_argument("--rows", nargs="*", choices=list(ROWS), default=list(ROWS), help="rows to (re)run")
    args = p.parse_args()
    table = []
    for name, (label, _) in ROWS.items():
        result_file = ROOT / "results" / "table" / name / "results.json"
        if name in args.rows and (args.rerun or not result_file.exists()):
            if args.no_run:
                continue
            subprocess.run(command(name), cwd=ROOT, check=True)
        if not result_file.exists():
            continue
        result = json.loads(result_file.read_text())
        calibration = result.get("calibration") or {}
        table.append({"method": label, **{f"ppl {k}": v for k, v in result["ppl"].items()},
                      "calibration s": calibration.get("seconds"), "peak MB": calibration.get("peak_memory_mb"),
                      "command": "python " + " ".join(command(name)[1:])})
    columns = [c for c in table[0] if c != "command"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in table:
        cells = [row[c] if isinstance(row[c], str) else ("-" if row[c] is None else f"{row[c]:.2f}") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    (ROOT / "results" / "table" / "table.md").write_text(text + "\n")
    (ROOT / "results" / "table" / "table.json").write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
