"""Layer-by-layer onloading (utils/onload.py): a model whose decoder blocks wait on disk (or on CPU) calibrates
to the same parameters, bit for bit, as the model held whole in memory, and evaluates to the same perplexity,
with at most one block's weights in memory at any time."""
import json
from dataclasses import replace

import pytest
import torch
from cli_helpers import forbid_model_load, one_line_error, run_main
from conftest import tiny_causal_lm, tiny_llama
from safetensors import safe_open
from tiny_folder import save_tiny_model

import main
from configs import load_config
from utils.calibrate import quantize
from utils.evaluation import perplexity
from utils.methods import ParamFile
from utils.models import get_module, model_fingerprint
from utils.onload import DeviceOnloader, DiskOnloader, load_offloaded, offload_blocks, onloaded_on_call

CONFIGS = {
    "FPQ": lambda c: replace(c.with_qbits([4, 4, 4, 2, 2, 2]), search=replace(c.search, rounds=1, n_candidates=8)),
    "NVFP4_GPTQ": lambda c: c,
    "MXFP4_Hadamard_GPTQ": lambda c: c,  # the rotation is folded into each block's weights as the block is read
    "FlatQuant": lambda c: replace(c, flat=replace(c.flat, epochs=1, nsamples=4, cali_bsz=2)),
}
CONFIG_NAMES = {"FPQ": "FPQ_config_llama", "NVFP4_GPTQ": "NVFP4_GPTQ_config", "FlatQuant": "FlatQuant_config_llama",
                "MXFP4_Hadamard_GPTQ": "MXFP4_Hadamard_GPTQ_config"}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny random Llama (hidden 64, 2 blocks, tied embeddings) as several safetensors shards."""
    folder = tmp_path_factory.mktemp("sharded")
    tiny_llama().save_pretrained(folder, max_shard_size="100KB")
    assert len(list(folder.glob("*.safetensors"))) > 2
    return folder


def calib():
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))


def eval_tokens():
    return torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(2))


def in_memory(folder):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().requires_grad_(False)


def calibrate(model, config, path):
    quantize(model, config, calib(), files=ParamFile(path, "calibrate", "tiny", model_fingerprint(model)),
             release_originals=True, progress=False)
    return path.read_bytes()


def watch_resident_blocks(model) -> list:
    """Record, whenever a decoder block runs, how many blocks hold real (non-meta) checkpoint tensors."""
    onloader, blocks, counts = model.onloader, get_module(model, "model.layers"), []

    def resident(index):
        for name in onloader.block_names(index):
            owner, _, attr = name.rpartition(".")
            if getattr(blocks[index].get_submodule(owner), attr).device.type != "meta":
                return True
        return False

    for block in blocks:  # inside the block: its own pre-hooks (onloaded_on_call's) have run
        block.mlp.register_forward_pre_hook(lambda *_: counts.append(sum(map(resident, range(len(blocks))))))
    return counts


@pytest.mark.parametrize("name", list(CONFIGS))
def test_disk_onloaded_calibration_equals_in_memory(name, sharded, tmp_path):
    config = CONFIGS[name](load_config(CONFIG_NAMES[name]))
    whole = in_memory(sharded)
    whole_file = calibrate(whole, config, tmp_path / "whole.safetensors")
    onloaded = load_offloaded(sharded, torch.float32, "cpu", tmp_path / "scratch")
    counts = watch_resident_blocks(onloaded)
    assert calibrate(onloaded, config, tmp_path / "disk.safetensors") == whole_file  # metadata included
    assert max(counts) == 1 and counts.count(1) >= 8  # each block ran on the 4 windows, one block at a time
    if name == "FlatQuant":  # the matrix file holds the trained parts; the folded, quantized weights are on disk
        for index in range(2):
            with safe_open(str(tmp_path / "scratch" / f"block_{index}.safetensors"), "pt") as f:
                for key in f.keys():
                    owner, _, attr = key.rpartition(".")
                    expected = getattr(whole.model.layers[index].get_submodule(owner), attr)
                    assert torch.equal(f.get_tensor(key), expected), key
    assert perplexity(onloaded, eval_tokens(), 32, progress=False) == perplexity(whole, eval_tokens(), 32,
                                                                                  progress=False)
    assert max(counts) == 1


def load_file_into(model, config, path, mode="reload"):
    quantize(model, config, calib(), files=ParamFile(path, mode, "tiny", model_fingerprint(model)),
             release_originals=True, progress=False)
    return perplexity(model, eval_tokens(), 32, progress=False)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_parameter_file_reloads_into_a_disk_onloaded_model(name, sharded, tmp_path):
    """--only_eval / --reuse_params (FlatQuant: --reload_matrix) with --offload disk: the file is installed one
    block at a time, and the model evaluates as the whole model with the same file."""
    config = CONFIGS[name](load_config(CONFIG_NAMES[name]))
    path = tmp_path / "params.safetensors"
    calibrate(in_memory(sharded), config, path)
    expected = load_file_into(in_memory(sharded), config, path)
    onloaded = load_offloaded(sharded, torch.float32, "cpu", tmp_path / "scratch")
    counts = watch_resident_blocks(onloaded)
    assert load_file_into(onloaded, config, path) == expected
    assert max(counts) == 1


def test_an_unfinished_file_is_not_continued_on_disk(sharded, tmp_path, monkeypatch):
    """--reuse_params on an unfinished file would continue it: refused in one line before any block runs."""
    from utils import llm_fp4
    from utils.errors import Interrupted, UsageError
    config = CONFIGS["FPQ"](load_config(CONFIG_NAMES["FPQ"]))
    unfinished, real = tmp_path / "unfinished.safetensors", llm_fp4.calibrate_block

    def interrupted_at_block_1(block, index, *args):
        if index == 1:
            raise KeyboardInterrupt
        return real(block, index, *args)
    with monkeypatch.context() as patch:
        patch.setattr(llm_fp4, "calibrate_block", interrupted_at_block_1)
        with pytest.raises(Interrupted, match="1 of 2 blocks are saved"):
            calibrate(in_memory(sharded), config, unfinished)
    onloaded = load_offloaded(sharded, torch.float32, "cpu", tmp_path / "scratch")
    counts = watch_resident_blocks(onloaded)
    with pytest.raises(UsageError, match="unfinished calibration.*continue it with --offload cpu or without"):
        load_file_into(onloaded, config, unfinished, mode="resume")
    assert counts == []


@pytest.mark.parametrize("family", ["gemma3", "qwen2"])
def test_other_families_onload_from_disk_identically(family, tmp_path):
    """Gemma 3: sliding and full attention layers with their own masks, scaled embedding, sandwich norms; Qwen2:
    q/k/v biases, untied head."""
    from test_families import tiny
    model = tiny("gemma3") if family == "gemma3" else tiny_causal_lm("qwen2")
    model.save_pretrained(tmp_path / "model", max_shard_size="100KB")
    config = load_config("NVFP4_config")
    whole = in_memory(tmp_path / "model")
    whole_file = calibrate(whole, config, tmp_path / "whole.safetensors")
    onloaded = load_offloaded(tmp_path / "model", torch.float32, "cpu")
    assert calibrate(onloaded, config, tmp_path / "disk.safetensors") == whole_file
    tokens = torch.randint(0, 256, (96,), generator=torch.Generator().manual_seed(2))
    assert perplexity(onloaded, tokens, 24, progress=False) == perplexity(whole, tokens, 24, progress=False)


def test_disk_onloaded_model_holds_no_block_and_fingerprints_as_loaded(sharded, tmp_path):
    onloaded, whole = load_offloaded(sharded, torch.float32, "cpu"), in_memory(sharded)
    assert all(p.device.type == "meta" for p in onloaded.model.layers.parameters())
    assert onloaded.lm_head.weight is onloaded.model.embed_tokens.weight  # tied as saved
    assert model_fingerprint(onloaded) == model_fingerprint(whole)
    assert perplexity(onloaded, eval_tokens(), 32, progress=False) == perplexity(whole, eval_tokens(), 32,
                                                                                  progress=False)
    scratch = onloaded.onloader.folder
    del onloaded
    import gc
    gc.collect()
    assert not scratch.exists()  # a temporary offload folder goes with its model


def test_device_onloading_moves_each_block_in_and_back(sharded, tmp_path, monkeypatch):
    config = load_config("NVFP4_config")
    whole_file = calibrate(in_memory(sharded), config, tmp_path / "whole.safetensors")
    model = offload_blocks(in_memory(sharded), "cpu")
    assert isinstance(model.onloader, DeviceOnloader)
    moves = []
    original = torch.nn.Module.to

    def to(module, *args, **kwargs):
        if module in list(model.model.layers):
            moves.append((list(model.model.layers).index(module), str(args[0])))
        return original(module, *args, **kwargs)
    monkeypatch.setattr(torch.nn.Module, "to", to)
    assert calibrate(model, config, tmp_path / "moved.safetensors") == whole_file
    assert moves == [(0, "cpu"), (0, "cpu"), (1, "cpu"), (1, "cpu")]  # in to the device, back home, in order


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_blocks_waiting_on_cpu_calibrate_on_cuda_as_the_whole_model_on_cuda(sharded, tmp_path):
    config = CONFIGS["NVFP4_GPTQ"](load_config("NVFP4_GPTQ_config"))
    whole_file = calibrate(in_memory(sharded).to("cuda"), config, tmp_path / "whole.safetensors")
    model = offload_blocks(in_memory(sharded), "cuda")
    assert model.model.embed_tokens.weight.is_cuda and not model.model.layers[0].mlp.up_proj.weight.is_cuda
    assert calibrate(model, config, tmp_path / "moved.safetensors") == whole_file
    assert all(p.device.type == "cpu" for p in model.model.layers.parameters())


@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_whole_model_forward_and_generation_onload_one_block_at_a_time(offload, sharded, tmp_path):
    """lm-eval and generate call the model's own forward: under onloaded_on_call the blocks come in as it reaches
    them, and logits and greedy generations (KV cache) equal the in-memory model's bit for bit."""
    config = load_config("NVFP4_GPTQ_config")
    whole = in_memory(sharded)
    calibrate(whole, config, tmp_path / "whole.safetensors")
    if offload == "disk":
        model = load_offloaded(sharded, torch.float32, "cpu", tmp_path / "off")
        counts = watch_resident_blocks(model)
    else:
        model, counts = offload_blocks(in_memory(sharded), "cpu"), []
    calibrate(model, config, tmp_path / "offloaded.safetensors")
    ids = eval_tokens()[:24].reshape(2, 12)
    with torch.no_grad():
        expected_logits, expected = whole(ids).logits, whole.generate(ids, max_new_tokens=6, do_sample=False)
        counts.clear()
        with onloaded_on_call(model):
            assert torch.equal(model(ids).logits, expected_logits)
            assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), expected)
    assert offload == "cpu" or (counts and max(counts) == 1)
    assert not any(block._forward_hooks or block._forward_pre_hooks for block in model.model.layers)


def test_main_lm_eval_tasks_with_offload_equal_the_whole_models(tmp_path):
    from transformers import AutoTokenizer
    folder = save_tiny_model(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(folder)  # lm-eval needs an end-of-text token: the first byte's
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(0)
    tokenizer.save_pretrained(folder)
    data = tmp_path / "cloze.jsonl"
    data.write_text("".join(f'{{"context": "Two plus {i} is", "endings": [" {2 + i}", " blue"], "label": 0}}\n'
                            for i in range(4)))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "cloze.yaml").write_text(
        f"task: tiny_cloze\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{endings}}'\ndoc_to_target: '{{label}}'\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n")
    (tmp_path / "tasks" / "say.yaml").write_text(
        f"task: tiny_say\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{context}}'\n"
        "doc_to_target: '{{endings[0]}}'\ngeneration_kwargs:\n  until: ['.']\n  max_gen_toks: 5\n"
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    common = ["--model_args", f"pretrained={folder}", "--device", "cpu", "--calib_dataset", "enwiki", "--calib_size",
              "4", "--calib_seqlen", "32", "--quant_config", "NVFP4_GPTQ_config", "--tasks", "tiny_cloze,tiny_say",
              "--include_path", str(tmp_path / "tasks"), "--log_samples"]
    runs = {}
    for name, flags in (("whole", []), ("disk", ["--offload", "disk"]), ("cpu", ["--offload", "cpu"])):
        main.run(main.build_parser().parse_args(common + ["--ptq_param_path", str(tmp_path / f"{name}.safetensors"),
                                                          "--output_path", str(tmp_path / name), *flags]))
        output = json.loads((tmp_path / name / "lm_eval_output.json").read_text())
        runs[name] = {task: [(s["resps"], s["filtered_resps"]) for s in samples]
                      for task, samples in output["samples"].items()}
    assert runs["disk"] == runs["whole"] == runs["cpu"] and len(runs["whole"]["tiny_say"]) == 4


def test_main_offload_disk_gives_the_same_results(tmp_path):
    folder = save_tiny_model(tmp_path / "model")
    common = ["--model_args", f"pretrained={folder}", "--device", "cpu", "--calib_dataset", "enwiki", "--calib_size",
              "4", "--calib_seqlen", "32", "--quant_config", "NVFP4_GPTQ_config", "--eval_ppl", "abcnews",
              "--ppl_seqlen", "32", "--ppl_limit", "4"]
    whole = main.run(main.build_parser().parse_args(common + ["--ptq_param_path", str(tmp_path / "a.safetensors")]))
    disk = main.run(main.build_parser().parse_args(common + ["--ptq_param_path", str(tmp_path / "b.safetensors"),
                                                             "--offload", "disk", "--offload_folder",
                                                             str(tmp_path / "off")]))
    assert disk["ppl"] == whole["ppl"]
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert sorted(p.name for p in (tmp_path / "off").iterdir()) == ["block_0.safetensors", "block_1.safetensors"]
    reloaded = main.run(main.build_parser().parse_args(common + ["--ptq_param_path", str(tmp_path / "a.safetensors"),
                                                                 "--only_eval", "--offload", "disk"]))
    assert reloaded["ppl"] == whole["ppl"]


def test_main_exports_a_disk_onloaded_model_block_by_block_as_the_whole_one(tmp_path):
    from safetensors.torch import load_file
    folder = save_tiny_model(tmp_path / "model")
    common = ["--model_args", f"pretrained={folder}", "--device", "cpu", "--calib_dataset", "enwiki", "--calib_size",
              "4", "--calib_seqlen", "32", "--quant_config", "NVFP4_GPTQ_config", "--eval_ppl", "abcnews",
              "--ppl_seqlen", "32", "--ppl_limit", "4"]
    for name, flags in (("whole", []), ("disk", ["--offload", "disk"])):
        main.run(main.build_parser().parse_args(common + ["--ptq_param_path", str(tmp_path / f"{name}.safetensors"),
                                                          "--save_compressed", str(tmp_path / f"{name}_export"),
                                                          *flags]))
    exported = {}
    for name in ("whole", "disk"):
        shards = sorted((tmp_path / f"{name}_export").glob("*.safetensors"))
        exported[name] = {k: v for shard in shards for k, v in load_file(str(shard)).items()}
    assert len(list((tmp_path / "disk_export").glob("*.safetensors"))) == 3  # outside the blocks, then a shard each
    assert exported["disk"].keys() == exported["whole"].keys()
    assert all(torch.equal(exported["disk"][k], exported["whole"][k]) for k in exported["whole"])
    configs = [json.loads((tmp_path / f"{name}_export" / "config.json").read_text()) for name in ("whole", "disk")]
    assert configs[0] == configs[1]
    read_back = [main.run(main.build_parser().parse_args(
        ["--model_args", f"pretrained={tmp_path / f'{name}_export'}", "--device", "cpu", "--eval_ppl", "abcnews",
         "--ppl_seqlen", "32", "--ppl_limit", "4"]))["ppl"] for name in ("whole", "disk")]
    assert read_back[0] == read_back[1]


def test_auto_dtype_is_the_checkpoints(tmp_path):
    folder = tmp_path / "bf16"
    tiny_llama().to(torch.bfloat16).save_pretrained(folder)
    model = load_offloaded(folder, "auto", "cpu")
    assert isinstance(model.onloader, DiskOnloader) and model.model.embed_tokens.weight.dtype == torch.bfloat16
    with model.onloader.onload(model.model.layers[1], 1):
        assert model.model.layers[1].mlp.up_proj.weight.dtype == torch.bfloat16


def test_a_non_finite_block_on_disk_is_refused_when_read(tmp_path, capsys):
    def poison(model):
        model.model.layers[1].mlp.up_proj.weight[3, 7] = float("nan")
    folder = save_tiny_model(tmp_path / "model", poison)
    capsys.readouterr()
    code, _, err = run_main(capsys, "--model_args", f"pretrained={folder}", "--device", "cpu", "--fp_only",
                            "--offload", "disk", "--eval_ppl", "abcnews", "--ppl_seqlen", "32", "--ppl_limit", "2")
    assert code == 2 and "Traceback" not in err  # found when block 1 is read, after block 0 ran (its progress bar)
    assert err.strip().splitlines()[-1].split("\r")[-1] == (
        f"error: model {folder}: weight model.layers.1.mlp.up_proj.weight holds 1 NaN or infinite values of 8192; the "
        "checkpoint is corrupt, download or convert it again")


@pytest.mark.parametrize("flags, message", [
    (["--offload_folder", "x"], "--offload_folder is where --offload disk keeps calibrated blocks; add --offload "
                                "disk or drop --offload_folder"),
    (["--offload", "cpu", "--plots"], "--plots cannot run with --offload cpu (the figures run the whole model); drop "
                                      "one of the two"),
    (["--offload", "disk", "--resume"], "--resume cannot run with --offload disk (the restored blocks' full-precision "
                                        "outputs need weights that a block kept on disk no longer has); drop one of "
                                        "the two"),
    (["--offload", "disk", "--model_args", "pretrained=org/model"],
     "--offload disk reads the blocks from a local model folder, and org/model is none; download it (safetensors) "
     "and pass pretrained=FOLDER"),
    (["--offload", "disk", "--offload_folder", __file__], f"--offload_folder {__file__} is an existing file; give a "
                                                            "folder"),
    (["--offload", "cpu", "--model_args", "pretrained=smollm2-135m-offline,use_accelerate=True"],
     "--model_args use_accelerate=True cannot run with --offload cpu (accelerate's device_map places the blocks "
     "itself); drop one of the two"),
])
def test_bad_offload_flags_are_refused_in_one_line(flags, message, capsys, monkeypatch):
    forbid_model_load(monkeypatch)
    code, _, err = run_main(capsys, "--device", "cpu", *flags)
    assert code == 2 and one_line_error(err) == f"error: {message}"


def test_accelerate_placement_that_offloads_weights_is_refused(tmp_path, monkeypatch, capsys):
    """With GPUs too small for the model, device_map="auto" leaves blocks behind meta tensors on CPU or disk: refused
    in one line naming --offload (simulated here by a device_map that puts block 1 on disk)."""
    from transformers import AutoModelForCausalLM
    folder = save_tiny_model(tmp_path / "model")
    load = AutoModelForCausalLM.from_pretrained
    placement = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
                 "model.rotary_emb": "cpu", "lm_head": "cpu"}

    def offloading(name, **kwargs):
        assert kwargs.pop("device_map") == "auto"
        return load(name, device_map=placement, offload_folder=str(tmp_path / "accelerate"), **kwargs)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", offloading)
    capsys.readouterr()
    code, _, err = run_main(capsys, "--model_args", f"pretrained={folder},use_accelerate=True", "--device", "cpu",
                            "--quant_config", "NVFP4_config", "--calib_size", "2", "--calib_seqlen", "16")
    last = err.strip().splitlines()[-1]  # after transformers' loading progress
    assert code == 2 and "Traceback" not in err and last.startswith("error: accelerate's device_map left 41% of ")
    assert last.endswith("% of the weights on CPU or disk (the GPUs cannot hold the model); drop "
                                        "use_accelerate=True and pass --offload cpu (or --offload disk), which "
                                        "calibrates one block at a time")
