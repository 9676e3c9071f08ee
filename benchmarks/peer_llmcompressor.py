"""llm-compressor on the toolkit's own calibration and perplexity windows, for the block-format table.

Run by the python of the separate environment that holds llm-compressor (never the toolkit's), e.g.

    .venv-peer/bin/python benchmarks/peer_llmcompressor.py --model FOLDER --tokens tokens.safetensors \
        --scheme NVFP4 --method gptq --output results.json [--save_dir FOLDER]

--tokens: a safetensors file that `benchmarks/smollm2_table.py --table blocks` writes with the toolkit's data code:
"calibration" [N, T] and, per perplexity dataset D, "ppl/D" [W, L] (its non-overlapping windows, in order).
--scheme: FP32 (no quantization) or a compressed-tensors preset (NVFP4, NVFP4A16, MXFP4, MXFP4A16, ...), applied to
every Linear but lm_head, as llm-compressor does by default. --method: rtn (QuantizationModifier) or gptq
(GPTQModifier). The model stays fake-quantized in memory after oneshot (compressed-tensors wraps each forward),
so the perplexity is the quantized model's; --save_dir then writes the compressed checkpoint. --skip_ppl leaves the
perplexity to the reader of that checkpoint (the table driver evaluates it with main.py, whose fake quantization
computes compressed-tensors' numbers): on a CPU compressed-tensors re-quantizes every weight at each forward, which
takes minutes per window.

Output: {"ppl": {dataset: value}, "calibration": {"seconds", "peak_memory_mb"}, settings, versions}.
Perplexity is the toolkit's (utils/evaluation.py): each window scored alone, exp(mean NLL of all scored tokens).
Peak memory is the process's resident set sampled every 20 ms during oneshot, the model included.
"""
from __future__ import annotations

import argparse
import json
import threading
import time
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

IGNORED = ["lm_head"]  # llm-compressor's default: the head stays full precision


def read_windows(path: Path) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    with safe_open(str(path), "pt") as tokens:
        order = json.loads(tokens.metadata()["ppl_datasets"])
        return tokens.get_tensor("calibration"), {name: tokens.get_tensor(f"ppl/{name}") for name in order}


class PeakRSS:
    """The resident set of this process, sampled every 20 ms while the block runs (as the toolkit's CPU probe)."""

    def __enter__(self):
        import psutil
        self.peak_mb, process, self._stop = 0.0, psutil.Process(), threading.Event()

        def sample():
            while True:
                self.peak_mb = max(self.peak_mb, process.memory_info().rss / 2 ** 20)
                if self._stop.wait(0.02):
                    return
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def modifier_for(scheme: str, method: str):
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    modifier = {"rtn": QuantizationModifier, "gptq": GPTQModifier}[method]
    return modifier(targets="Linear", scheme=scheme, ignore=IGNORED)


def needs_data(scheme: str, method: str) -> bool:
    """GPTQ needs its Hessians and static activation scales (NVFP4's input global scale) their observers; RTN of
    weights with no or fully dynamic input quantization (NVFP4A16, MXFP4) is data-free, as llm-compressor runs it."""
    from compressed_tensors.quantization import preset_name_to_scheme
    inputs = preset_name_to_scheme(scheme, ["Linear"]).input_activations
    return method == "gptq" or (inputs is not None and inputs.dynamic is not True)


def calibrate(model, tokenizer, calibration: torch.Tensor | None, modifier) -> dict:
    """oneshot on exactly these windows, in this order, untruncated (or data-free when `calibration` is None):
    seconds and peak resident memory."""
    from datasets import Dataset
    from llmcompressor import oneshot
    data = {} if calibration is None else dict(
        dataset=Dataset.from_dict({"input_ids": calibration.tolist(),
                                   "attention_mask": torch.ones_like(calibration).tolist()}),
        num_calibration_samples=len(calibration), max_seq_length=calibration.shape[1],
        shuffle_calibration_samples=False, batch_size=1)
    started = time.perf_counter()
    with PeakRSS() as memory:
        oneshot(model=model, tokenizer=tokenizer, recipe=modifier, **data)
    return {"seconds": round(time.perf_counter() - started, 2), "peak_memory_mb": round(memory.peak_mb, 1),
            "windows": 0 if calibration is None else len(calibration)}


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4) -> float:
    """Each window scored on its own (a batch only shares the fake quantization of the weights, which
    compressed-tensors redoes at every forward)."""
    total_nll = 0.0
    for start in range(0, len(windows), batch_size):
        ids = windows[start:start + batch_size]
        logits = model(ids, use_cache=False).logits[:, :-1].float()
        total_nll += F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
    return float(torch.exp(torch.tensor(total_nll / (windows.shape[0] * (windows.shape[1] - 1)))))


@torch.no_grad()
def input_quantization_effect(model, window: torch.Tensor) -> dict:
    """How much the first quantized linear's output moves away from its weight-only-quantized output on real
    inputs: zero when the inputs pass unquantized (W4A16), the activation error when they are quantized."""
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize
    name, layer = next((n, m) for n, m in model.named_modules() if getattr(m, "quantization_scheme", None))
    seen = {}
    handle = layer.register_forward_hook(lambda _m, args, out: seen.update(x=args[0], y=out))
    try:
        model(window.reshape(1, -1), use_cache=False)
    finally:
        handle.remove()
    weight = forward_quantize(layer, layer.weight, "weight", layer.quantization_scheme.weights)
    weight_only = F.linear(seen["x"], weight, layer.bias)
    return {"layer": name, "input_quantized": layer.quantization_scheme.input_activations is not None,
            "relative_output_change": float((seen["y"] - weight_only).norm() / weight_only.norm())}


def versions() -> dict:
    return {name: version(name) for name in ("llmcompressor", "compressed-tensors", "torch", "transformers")}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model folder")
    p.add_argument("--tokens", required=True, type=Path, help="the token file the table driver writes")
    p.add_argument("--scheme", required=True, help="FP32 or a compressed-tensors preset scheme name")
    p.add_argument("--method", choices=["rtn", "gptq"], default="rtn")
    p.add_argument("--output", required=True, type=Path, help="results JSON")
    p.add_argument("--save_dir", type=Path, default=None, help="write the compressed checkpoint here")
    p.add_argument("--skip_ppl", action="store_true", help="save the checkpoint without scoring it here")
    args = p.parse_args()
    if args.skip_ppl and (args.save_dir is None or args.scheme == "FP32"):
        p.error("--skip_ppl needs a quantized --scheme and --save_dir: the checkpoint is what gets scored")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    calibration, evaluation = read_windows(args.tokens)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval().requires_grad_(False)
    result = {"peer": "llm-compressor", "scheme": args.scheme, "versions": versions(),
              "tokens": {"file": str(args.tokens), "calibration": list(calibration.shape),
                         **{f"ppl/{name}": list(w.shape) for name, w in evaluation.items()}}}
    if args.scheme != "FP32":
        modifier = modifier_for(args.scheme, args.method)
        result.update(method=args.method, ignore=IGNORED, modifier=type(modifier).__name__,
                      modifier_settings=json.loads(modifier.model_dump_json(exclude={"config_groups"})),
                      calibration=calibrate(model, tokenizer, calibration if needs_data(args.scheme, args.method)
                                            else None, modifier))
    if not args.skip_ppl:
        if args.scheme != "FP32":
            result["input_quantization_check"] = input_quantization_effect(model, next(iter(evaluation.values()))[0])
        result["ppl"] = {name: perplexity(model, windows) for name, windows in evaluation.items()}
    if args.save_dir is not None and args.scheme != "FP32":
        model.save_pretrained(args.save_dir, save_compressed=True)
        tokenizer.save_pretrained(args.save_dir)
        result["checkpoint"] = str(args.save_dir)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("scheme", "ppl") if k in result} | {"calibration": result.get("calibration")}))


if __name__ == "__main__":
    main()
