"""Collect results.json files into the papers' table layouts, with the published numbers side by side.

    python complete_scripts/collect.py [RESULTS_DIR ...] [--protocol llmfp4|flatquant] [--output table.md]

llmfp4: LLM-FP4 Table 1 (BoolQ, PIQA, HellaSwag, WinoGrande, ARC-e, ARC-c; `acc`; average of the six).
flatquant: FlatQuant's zero-shot protocol (PIQA, HellaSwag, ARC-e, ARC-c, WinoGrande, LAMBADA; `acc_norm`
where the task has it, else `acc`; average of the six) with WikiText-2 perplexity.
Each cell is "ours (paper, difference)" where the paper has the row, else just ours.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROTOCOLS = {
    "llmfp4": {"tasks": ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge"],
               "headers": ["BoolQ", "PIQA", "HS", "WG", "ARC-e", "ARC-c"], "norm": False, "ppl": False},
    "flatquant": {"tasks": ["piqa", "hellaswag", "arc_easy", "arc_challenge", "winogrande", "lambada_openai"],
                  "headers": ["PIQA", "HS", "ARC-e", "ARC-c", "WG", "LAMBADA"], "norm": True, "ppl": True},
}

METHODS = {"FP": "Full precision", "MinMax_INT_config_llama": "MinMax INT", "MinMax_config_llama": "MinMax FP",
           "FPQ_baseline_config_llama": "FPQ baseline", "FPQ_config_llama": "FPQ",
           "FPQ_simulated_config_llama": "FPQ (simulated pre-shift)"}

MODELS = {"huggyllama/llama-7b": "LLaMA-7B", "huggyllama/llama-13b": "LLaMA-13B",
          "meta-llama/Llama-2-7b-hf": "LLaMA-2-7B", "meta-llama/Meta-Llama-3-8B": "LLaMA-3-8B",
          "Qwen/Qwen2.5-7B-Instruct": "Qwen2.5-7B-Instruct"}

# LLM-FP4 Table 1 (percent): (model, method, E/W/A) -> BoolQ, PIQA, HS, WG, ARC-e, ARC-c
LLMFP4_TABLE1 = {
    ("LLaMA-7B", "Full precision", "16/16/16"): [75.1, 78.7, 56.9, 69.9, 75.3, 41.9],
    ("LLaMA-7B", "MinMax INT", "8/8/8"): [64.3, 66.8, 40.5, 57.4, 59.0, 29.6],
    ("LLaMA-7B", "MinMax FP", "8/8/8"): [74.9, 78.6, 56.8, 69.5, 75.5, 41.6],
    ("LLaMA-7B", "FPQ baseline", "8/8/8"): [75.8, 78.3, 55.9, 69.5, 75.6, 41.3],
    ("LLaMA-7B", "FPQ", "8/8/8"): [75.6, 78.2, 56.6, 70.2, 74.6, 40.7],
    ("LLaMA-7B", "MinMax INT", "4/4/16"): [64.1, 76.1, 51.6, 66.3, 72.4, 40.0],
    ("LLaMA-7B", "MinMax FP", "4/4/16"): [73.0, 77.9, 55.2, 69.1, 73.6, 40.9],
    ("LLaMA-7B", "FPQ baseline", "4/4/16"): [74.8, 77.9, 55.6, 69.5, 75.2, 41.0],
    ("LLaMA-7B", "FPQ", "4/4/16"): [74.2, 77.8, 55.8, 69.9, 74.9, 40.4],
    ("LLaMA-7B", "MinMax INT", "4/4/8"): [50.4, 56.5, 27.9, 46.5, 36.1, 21.2],
    ("LLaMA-7B", "MinMax FP", "4/4/8"): [73.0, 77.5, 55.0, 69.3, 73.6, 40.9],
    ("LLaMA-7B", "FPQ baseline", "4/4/8"): [75.0, 77.6, 55.9, 69.9, 74.3, 39.4],
    ("LLaMA-7B", "FPQ", "4/4/8"): [75.0, 77.7, 55.5, 69.8, 74.5, 39.9],
    ("LLaMA-7B", "MinMax INT", "4/4/4"): [54.1, 51.7, 25.6, 49.8, 24.7, 22.9],
    ("LLaMA-7B", "MinMax FP", "4/4/4"): [47.3, 53.1, 25.7, 50.7, 25.1, 22.4],
    ("LLaMA-7B", "FPQ baseline", "4/4/4"): [57.4, 56.6, 30.2, 51.1, 37.7, 23.2],
    ("LLaMA-7B", "FPQ", "4/4/4"): [64.2, 73.5, 47.8, 63.7, 65.9, 33.6],
    ("LLaMA-13B", "Full precision", "16/16/16"): [77.9, 79.2, 59.9, 72.6, 77.4, 46.4],
    ("LLaMA-13B", "MinMax INT", "8/8/8"): [60.6, 69.6, 46.0, 61.5, 63.3, 32.8],
    ("LLaMA-13B", "MinMax FP", "8/8/8"): [78.0, 79.1, 60.0, 72.3, 77.2, 47.1],
    ("LLaMA-13B", "FPQ baseline", "8/8/8"): [78.0, 79.1, 59.9, 72.3, 77.2, 47.1],
    ("LLaMA-13B", "FPQ", "8/8/8"): [78.1, 78.5, 59.1, 72.4, 76.4, 46.1],
    ("LLaMA-13B", "MinMax INT", "4/4/8"): [52.1, 65.0, 36.4, 53.9, 52.3, 29.0],
    ("LLaMA-13B", "MinMax FP", "4/4/8"): [78.0, 78.9, 58.0, 71.6, 76.0, 44.8],
    ("LLaMA-13B", "FPQ baseline", "4/4/8"): [76.2, 78.2, 57.9, 71.9, 75.1, 43.9],
    ("LLaMA-13B", "FPQ", "4/4/8"): [76.4, 78.5, 58.2, 72.1, 75.2, 44.7],
    ("LLaMA-13B", "MinMax INT", "4/4/4"): [54.5, 52.7, 25.5, 51.1, 25.3, 22.1],
    ("LLaMA-13B", "MinMax FP", "4/4/4"): [45.8, 51.7, 25.5, 49.5, 25.0, 22.8],
    ("LLaMA-13B", "FPQ baseline", "4/4/4"): [54.3, 57.7, 35.7, 52.2, 41.1, 25.7],
    ("LLaMA-13B", "FPQ", "4/4/4"): [71.9, 74.8, 53.3, 66.7, 71.7, 39.9],
}

# FlatQuant README (W4A4KV4 INT): (model, method) -> (WikiText-2 ppl, six-task average)
FLATQUANT_TABLE = {
    ("LLaMA-2-7B", "Full precision"): (5.47, 69.79), ("LLaMA-2-7B", "FlatQuant RTN"): (5.79, 67.96),
    ("LLaMA-2-7B", "FlatQuant GPTQ"): (5.78, 67.47), ("LLaMA-3-8B", "Full precision"): (6.14, 73.23),
    ("LLaMA-3-8B", "FlatQuant RTN"): (6.98, 71.23), ("LLaMA-3-8B", "FlatQuant GPTQ"): (6.90, 71.33),
    ("Qwen2.5-7B-Instruct", "Full precision"): (8.36, 70.75), ("Qwen2.5-7B-Instruct", "FlatQuant RTN"): (8.46, 68.62),
}


def setting(result: dict) -> str:
    """E/W/A bits as the papers write them (results store --qbits as W A E ...)."""
    qbits = result.get("qbits")
    if not qbits:
        return "16/16/16"
    w, a, e = qbits[:3]
    return f"{e}/{w}/{a}"


def method_name(result: dict) -> str:
    settings = result.get("settings") or {}
    if settings.get("method") == "flatquant":
        return "FlatQuant GPTQ" if settings.get("gptq") else "FlatQuant RTN"
    return METHODS.get(result["quant_config"], result["quant_config"])


def task_score(metrics: dict, normalized: bool) -> float | None:
    if normalized and "acc_norm" in metrics:
        return 100 * metrics["acc_norm"]
    return 100 * metrics["acc"] if "acc" in metrics else None


def load_rows(folders: list[Path]) -> list[dict]:
    rows = []
    for folder in folders:
        for path in sorted(folder.rglob("results.json")):
            result = json.loads(path.read_text())
            if "tasks" not in result and "ppl" not in result:
                continue
            rows.append({"path": str(path.parent), "model": MODELS.get(result["model"], result["model"]),
                         "method": method_name(result), "setting": setting(result), "result": result})
    return rows


def cell(ours: float | None, paper: float | None, digits: int = 1) -> str:
    if ours is None:
        return "-" if paper is None else f"- ({paper:.{digits}f})"
    if paper is None:
        return f"{ours:.{digits}f}"
    return f"{ours:.{digits}f} ({paper:.{digits}f}, {ours - paper:+.{digits}f})"


def table(rows: list[dict], protocol: str) -> tuple[str, list[dict]]:
    spec = PROTOCOLS[protocol]
    headers = ["model", "method", "E/W/A", *spec["headers"], "Avg"] + (["Wiki2 ppl"] if spec["ppl"] else [])
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    collected = []
    for row in sorted(rows, key=lambda r: (r["model"], r["method"], r["setting"])):
        tasks = row["result"].get("tasks") or {}
        scores = [task_score(tasks[t], spec["norm"]) if t in tasks else None for t in spec["tasks"]]
        average = sum(scores) / len(scores) if all(s is not None for s in scores) else None
        if protocol == "llmfp4":
            paper = LLMFP4_TABLE1.get((row["model"], row["method"], row["setting"]))
            paper_avg = sum(paper) / len(paper) if paper else None
            cells = [cell(s, p) for s, p in zip(scores, paper or [None] * len(scores))] + [cell(average, paper_avg)]
            paper_ppl = None
        else:
            paper_ppl, paper_avg = FLATQUANT_TABLE.get((row["model"], row["method"]), (None, None))
            cells = [cell(s, None) for s in scores] + [cell(average, paper_avg, 2)]
        if spec["ppl"]:
            ppl = row["result"].get("ppl", {}).get("wikitext2")
            cells.append(cell(ppl, paper_ppl, 2))
        if all(c == "-" for c in cells):
            continue
        lines.append("| " + " | ".join([row["model"], row["method"], row["setting"], *cells]) + " |")
        collected.append({"path": row["path"], "model": row["model"], "method": row["method"],
                          "setting": row["setting"], "scores": dict(zip(spec["tasks"], scores)), "average": average,
                          "paper": paper if protocol == "llmfp4" else None, "paper_average": paper_avg})
    return "\n".join(lines), collected


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="*", default=["results"], help="folders searched for results.json")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="llmfp4")
    p.add_argument("--output", default=None, help="also write the table (.md) and the rows (.json beside it)")
    p.add_argument("--plots", default=None, metavar="FOLDER",
                   help="draw ours vs the paper as grouped bars: FOLDER/paper_comparison.png (+ .json); "
                        "needs matplotlib")
    args = p.parse_args(argv)
    folders = [Path(f) for f in args.folders]
    missing = [str(f) for f in folders if not f.is_dir()]
    if missing:
        print(f"error: no such results folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    text, collected = table(load_rows(folders), args.protocol)
    print(text)
    if args.output:
        out = Path(args.output)
        out.write_text(text + "\n")
        out.with_suffix(".json").write_text(json.dumps(collected, indent=2))
    if args.plots:
        print(f"figure written to {plot_comparison(Path(args.plots), collected, args.protocol, args.folders)}")
    return 0


def plot_comparison(folder: Path, collected: list[dict], protocol: str, sources: list[str]) -> Path:
    """paper_comparison.json (the rows with the paper's numbers) and its grouped-bar PNG."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the toolkit, when run as a script
    from utils.plots import draw
    spec = PROTOCOLS[protocol]
    metric = "acc_norm where the task has it, else acc" if spec["norm"] else "acc"
    data = {"figure": "paper_comparison", "caption": f"collect.py {' '.join(sources)} --protocol {protocol}",
            "tasks": spec["tasks"], "headers": spec["headers"], "metric": metric, "rows": collected}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "paper_comparison.json"
    path.write_text(json.dumps(data, indent=2))
    return draw(path)


if __name__ == "__main__":
    sys.exit(main())
