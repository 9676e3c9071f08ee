"""Figures of a run as PNGs (matplotlib, headless Agg backend), drawn from the `<figure>.json` files beside them.

    python -m utils.plots RESULTS_DIR      # redraw every figure of a finished run

The data come from utils/figure_data.py (`main.py --plots` writes them); the heat map of formats and biases is
rebuilt from the run's parameter file (results.json's `param_path`) when its JSON is missing. matplotlib is an
optional dependency of this feature only.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import UsageError, UserError

DPI = 110


class PlotError(UserError, ValueError):
    pass


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError("--plots needs matplotlib; pip install matplotlib (it is listed in requirements.txt)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def short(path: str) -> str:
    """model.layers.3.self_attn.q_proj -> block 3 q_proj"""
    parts = path.split(".")
    index = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    return path if index is None else f"block {parts[index]} {parts[-1]}"


def _log_y(ax):
    """Log y axis with labels on the decades only (minor labels crowd small panels)."""
    from matplotlib.ticker import NullFormatter
    ax.set_yscale("log")
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(alpha=0.3, which="both")


def _figure_legend(fig, ax):
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.965), ncol=len(labels), fontsize=9,
               frameon=False)


def _finish(plt, fig, data: dict, title: str, png: Path):
    fig.suptitle(title, fontsize=13)
    fig.text(0.5, 0.005, data["caption"], ha="center", va="bottom", fontsize=9, color="0.25", wrap=True)
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    fig.savefig(png, dpi=DPI)
    plt.close(fig)


def draw_channel_ranges(plt, data: dict, png: Path):
    layers = data["layers"]
    fig, axes = plt.subplots(len(layers), 2, figsize=(12, 2.3 * len(layers) + 1), squeeze=False)
    for row, (path, ranges) in zip(axes, layers.items()):
        for ax, sort in zip(row, (False, True)):
            for key, color, label in (("before", "0.55", "before (input of the full-precision layer)"),
                                      ("after", "tab:blue", "after (what the activation quantizer sees)")):
                values = sorted(ranges[key], reverse=True) if sort else ranges[key]
                ax.plot(range(len(values)), values, color=color, lw=0.6, label=label)
            _log_y(ax)
            channels = len(ranges["before"])
            ax.set_title(f"{short(path)} ({channels} channels)" + (", sorted" if sort else ""), fontsize=10)
            ax.set_xlabel("input channel, sorted by range" if sort else "input channel index")
            ax.set_ylabel("max |x| over tokens")
    _figure_legend(fig, axes[0][0])
    title = f"Per-channel activation ranges before / after the {_transform_word(data)} ({data['tokens']} tokens)"
    _finish(plt, fig, data, title, png)


def _transform_word(data: dict) -> str:
    return "FlatQuant transforms" if data["method"].startswith("FlatQuant") else "pre-shift"


def draw_layer_error(plt, data: dict, png: Path):
    layers = data["layers"]
    fig, ax = plt.subplots(figsize=(13, 5))
    x = range(len(layers))
    ax.plot(x, [r["minmax"] for r in layers], "o-", ms=3, lw=0.8, color="tab:red", label="MinMax, ranges from these tokens")
    calibrated = [(i, r["calibrated"]) for i, r in enumerate(layers) if r["calibrated"] is not None]
    ax.plot([i for i, _ in calibrated], [e for _, e in calibrated], "o-", ms=3, lw=0.8, color="tab:blue",
            label=data["method"])
    _log_y(ax)
    ax.set_xlabel("linear layer, in execution order")
    ax.set_ylabel("relative MSE of the layer output  ||Y_q - Y||² / ||Y||²")
    starts = [i for i, r in enumerate(layers) if i == 0 or _block(r["path"]) != _block(layers[i - 1]["path"])]
    step = max(1, len(starts) // 15)
    ax.set_xticks([starts[i] for i in range(0, len(starts), step)])
    ax.set_xticklabels([f"block {_block(layers[starts[i]]['path'])}" for i in range(0, len(starts), step)],
                       rotation=45, ha="right", fontsize=8)
    ax.legend()
    skipped = data.get("not_comparable")
    note = f"\n(left out: {', '.join(skipped)}, whose outputs folding moves to another basis)" if skipped else ""
    title = f"Per-layer output error on the block's full-precision inputs ({data['tokens']} tokens){note}"
    _finish(plt, fig, data, title, png)


def _block(path: str) -> str:
    return next((p for p in path.split(".") if p.isdigit()), "-")


def draw_flatness(plt, data: dict, png: Path):
    layers = data["layers"]
    fig, axes = plt.subplots(len(layers), 2, figsize=(11, 2.3 * len(layers) + 1), squeeze=False)
    for row, (path, values) in zip(axes, layers.items()):
        units = ("max |W| over output rows", "max |x| over tokens")
        for ax, operand, unit in zip(row, ("weight", "activation"), units):
            before, after = (("weight_before", "weight_after") if operand == "weight" else ("before", "after"))
            for key, color, label in ((before, "0.55", "before"), (after, "tab:green", "after")):
                curve = sorted(values[key], reverse=True)
                ax.plot(range(len(curve)), curve, color=color, lw=1.2, label=label)
            _log_y(ax)
            ax.set_title(f"{short(path)}: {operand}s", fontsize=10)
            ax.set_xlabel("input channel, sorted by magnitude")
            ax.set_ylabel(unit)
    _figure_legend(fig, axes[0][0])
    _finish(plt, fig, data, f"Flatness: sorted channel magnitudes before / after ({data['method']})", png)


def draw_format_map(plt, data: dict, png: Path):
    import numpy as np
    from matplotlib.patheffects import withStroke
    linears, blocks = data["linears"], data["blocks"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.32 * blocks + 2.5), squeeze=False)
    for ax, side in zip(axes[0], ("weight", "activation")):
        grid = np.array([[np.nan if v is None else v for v in row] for row in data[side]["value"]], dtype=float)
        image = ax.imshow(grid, aspect="auto", cmap="viridis")
        if data[side]["value_kind"]:
            fig.colorbar(image, ax=ax, label=f"{data[side]['value_kind']} (mean over rows)")
        for b in range(blocks):
            for j in range(len(linears)):
                ax.text(j, b, data[side]["format"][b][j], ha="center", va="center", fontsize=6,
                        path_effects=[withStroke(linewidth=1.5, foreground="white")])
        ax.set_xticks(range(len(linears)))
        ax.set_xticklabels([n.split(".")[-1] for n in linears], rotation=30, ha="right")
        ax.set_yticks(range(0, blocks, max(1, blocks // 15)))
        ax.set_xlabel("linear")
        ax.set_ylabel("block")
        kind = data[side]["value_kind"] or "no stored range"
        ax.set_title(f"{side}s: format (text) and {kind} (colour)", fontsize=10)
    _finish(plt, fig, data, "Format and exponent bias (or clip factor) of every layer", png)


def draw_paper_comparison(plt, data: dict, png: Path):
    import numpy as np
    rows = data["rows"]
    columns = 2 if len(rows) > 1 else 1
    lines = (len(rows) + columns - 1) // columns
    fig, axes = plt.subplots(lines, columns, figsize=(7 * columns, 3.6 * lines + 1), squeeze=False)
    for ax, row in zip(axes.flat, rows):
        labels = [*data["headers"], "Avg"]
        ours = [*(row["scores"][t] for t in data["tasks"]), row["average"]]
        paper = [*(row["paper"] or [None] * len(data["tasks"])), row.get("paper_average")]
        x = np.arange(len(labels))
        ax.bar(x - 0.2, [np.nan if v is None else v for v in ours], 0.4, label="ours", color="tab:blue")
        ax.bar(x + 0.2, [np.nan if v is None else v for v in paper], 0.4, label="paper", color="0.6")
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel(f"{data['metric']} (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{row['model']} {row['method']} E/W/A {row['setting']}", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    _finish(plt, fig, data, "Zero-shot accuracy: ours vs the paper, per task and setting", png)


DRAWERS = {"channel_ranges": draw_channel_ranges, "layer_error": draw_layer_error, "flatness": draw_flatness,
           "format_map": draw_format_map, "paper_comparison": draw_paper_comparison}


def draw(json_path: str | Path) -> Path:
    """Draw one `<figure>.json` as `<figure>.png` beside it."""
    json_path = Path(json_path)
    data = json.loads(json_path.read_text())
    png = json_path.with_suffix(".png")
    DRAWERS[data["figure"]](pyplot(), data, png)
    return png


def add_format_map(folder: Path) -> Path | None:
    """format_map.json from the run's parameter / matrix file, unless it is there or the run has none."""
    from .figure_data import run_caption, run_format_map, write_figure_data
    target, results = folder / "format_map.json", folder / "results.json"
    if target.exists() or not results.exists():
        return None
    result = json.loads(results.read_text())
    data = run_format_map(result)
    if data is None:
        return None
    write_figure_data(folder, {"format_map": data}, run_caption(result))
    return target


def redraw(folder: str | Path) -> list[Path]:
    """Every figure of a results folder, from its JSON files (the heat map also from its parameter file)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"no results folder {folder}; pass the --output_path of a run")
    pyplot()
    add_format_map(folder)
    figures = [p for p in sorted(folder.glob("*.json")) if p.stem in DRAWERS]
    return [draw(p) for p in figures]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a results folder (main.py --output_path) or a folder of figure JSON files")
    args = parser.parse_args(argv)
    try:
        written = redraw(args.folder)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for png in written:
        print(png)
    if not written:
        print(f"no figure data in {args.folder}; run main.py with --plots", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
