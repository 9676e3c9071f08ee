"""results.json plus a readable table (results.md) for each run."""
from __future__ import annotations

import json
from pathlib import Path


def format_table(result: dict) -> str:
    qbits = result.get("qbits")
    bits = "FP" if not qbits else "W{}A{}E{}".format(*qbits[:3])
    rows = [("model", result["model"]), ("quant_config", f"{result['quant_config']} ({bits})")]
    calibration = result.get("calibration")
    if calibration:
        rows += [("calibration seconds", f"{calibration['seconds']:.1f}"),
                 ("calibration peak memory (MB)", f"{calibration['peak_memory_mb']:.0f}")]
    rows += [(f"perplexity {name}", f"{value:.3f}") for name, value in result.get("ppl", {}).items()]
    for task, metrics in (result.get("tasks") or {}).items():
        rows += [(f"{task} {metric}", f"{value:.4f}") for metric, value in metrics.items()]
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'what'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
    return "\n".join(lines)


def write_results(folder: Path, result: dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(result, indent=2, default=str))
    (folder / "results.md").write_text(format_table(result) + "\n")
