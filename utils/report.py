"""results.json plus a readable table (results.md) for each run."""
from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import UserError
from .files import atomic_write_text


class NonFiniteResult(UserError, ArithmeticError):
    pass


def check_finite_results(result: dict):
    """Refuse to report a perplexity or lm-eval metric that is NaN or infinite: it is never a result, but a
    sign of non-finite quantizer parameters or weights, or of an overflow in half precision."""
    values = [(f"perplexity on {name}", value) for name, value in result.get("ppl", {}).items()]
    values += [(f"lm-eval task {task}, metric {metric},", value) for task, metrics in (result.get("tasks") or {}).items()
               for metric, value in metrics.items() if "_stderr" not in metric]
    for what, value in values:
        if isinstance(value, (int, float)) and not math.isfinite(value):
            raise NonFiniteResult(f"{what} is {value}: the quantized model's outputs are not finite; check the "
                                  "parameter file and the weights, or evaluate with dtype=float32")


class ResultsFileError(UserError, ValueError):
    pass


def format_table(result: dict) -> str:
    qbits = result.get("qbits")
    bits = result.get("format") or ("FP" if not qbits else "W{}A{}E{}".format(*qbits[:3]))
    rows = [("model", result["model"]), ("quant_config", f"{result['quant_config']} ({bits})")]
    calibration = result.get("calibration")
    if calibration:
        rows += [("calibration seconds", f"{calibration['seconds']:.1f}"),
                 ("calibration peak memory (MB)", f"{calibration['peak_memory_mb']:.0f}")]
    rows += [(f"perplexity {name}", f"{value:.3f}") for name, value in result.get("ppl", {}).items()]
    for task, metrics in (result.get("tasks") or {}).items():
        rows += [(f"{task} {metric}", f"{value:.4f}") for metric, value in metrics.items() if "_stderr" not in metric]
    if result.get("paper_average") is not None:
        rows.append(("average acc of the paper's six tasks", f"{result['paper_average']:.4f}"))
    if result.get("evaluation_seconds") is not None:
        rows.append(("lm-eval seconds", f"{result['evaluation_seconds']:.1f}"))
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'what'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
    return "\n".join(lines)


def write_results(folder: Path, result: dict, lm_eval_output: dict | None = None):
    """results.json, results.md and, after --tasks, lm-eval's own full output (lm_eval_output.json)."""
    atomic_write_text(folder / "results.json", json.dumps(result, indent=2, default=str))
    if lm_eval_output is not None:
        atomic_write_text(folder / "lm_eval_output.json", json.dumps(lm_eval_output, indent=2, default=str))
    atomic_write_text(folder / "results.md", format_table(result) + "\n")


def previous_results_model(folder: Path) -> str | None:
    """The model of the results.json already in `folder` (None when there is none or it names none)."""
    existing = folder / "results.json"
    if not existing.exists():
        return None
    try:
        previous = json.loads(existing.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        reason = f"{error.msg} at line {error.lineno}" if isinstance(error, json.JSONDecodeError) else "not UTF-8"
        raise ResultsFileError(f"{existing} is not a results file ({reason}); remove it or choose another "
                               "--output_path") from None
    if not isinstance(previous, dict):
        raise ResultsFileError(f"{existing} is not a results file (not a JSON object); remove it or choose "
                               "another --output_path")
    return previous.get("model")
