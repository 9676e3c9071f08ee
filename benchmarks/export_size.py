"""Size on disk of the offline SmolLM2-135M exported as a compressed-tensors checkpoint, against the same model
saved in FP16, and the exported folder's perplexity read back through our reader against the in-memory model.

python benchmarks/export_size.py [--config NVFP4_config] [--calib 4x128] [--windows 4]
Results: benchmarks/results/export_size.json and one line on stdout.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def folder_bytes(folder: Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in folder.glob(pattern) if f.is_file())


def main(argv=None) -> dict:
    import torch

    from configs import load_config
    from utils import data, evaluation
    from utils.calibrate import quantize
    from utils.export import export
    from utils.models import OFFLINE_MODEL, load_model
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="NVFP4_config")
    p.add_argument("--calib", default="4x128", help="calibration windows x tokens")
    p.add_argument("--windows", type=int, default=4, help="perplexity windows of 256 tokens (enwiki-heldout)")
    args = p.parse_args(argv)
    count, seqlen = (int(v) for v in args.calib.split("x"))
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        fp16, tokenizer = load_model(OFFLINE_MODEL, "float16")
        fp16.save_pretrained(scratch / "fp16")
        del fp16
        # bfloat16, the dtype the engines serve: the layers left in full precision are written in it
        model, tokenizer = load_model(OFFLINE_MODEL, "bfloat16")
        config = load_config(args.config)
        quantize(model, config, data.calibration_samples(tokenizer, "enwiki", count, seqlen, 0), progress=False)
        folder = export(model, scratch / "export", tokenizer, config, model_name=OFFLINE_MODEL)
        tokens = data.evaluation_tokens(tokenizer, "enwiki-heldout")
        in_memory = evaluation.perplexity(model, tokens, 256, args.windows, progress=False)
        del model
        read_back, _ = load_model(str(folder), "bfloat16")
        result = {"model": OFFLINE_MODEL, "config": args.config, "calibration": args.calib,
                  "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "torch": torch.__version__,
                  "fp16_safetensors_bytes": folder_bytes(scratch / "fp16", "*.safetensors"),
                  "export_safetensors_bytes": folder_bytes(folder, "*.safetensors"),
                  "export_folder_bytes": folder_bytes(folder),
                  "ppl_in_memory": in_memory,
                  "ppl_read_back": evaluation.perplexity(read_back, tokens, 256, args.windows, progress=False)}
    result["ratio_to_fp16"] = round(result["export_safetensors_bytes"] / result["fp16_safetensors_bytes"], 4)
    print(f"{OFFLINE_MODEL} {args.config}: export {result['export_safetensors_bytes'] / 2**20:.1f} MiB of safetensors "
          f"vs FP16 {result['fp16_safetensors_bytes'] / 2**20:.1f} MiB ({result['ratio_to_fp16']:.3f}x); "
          f"perplexity in memory {result['ppl_in_memory']:.3f}, read back {result['ppl_read_back']:.3f}")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "export_size.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
