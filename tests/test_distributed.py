"""Data-parallel calibration (utils/distributed.py): two gloo processes on CPU, each calibrating on half of the
windows, write the parameter file one process writes on all of them, and both ranks end with the same model.

Where only maxima are reduced (MinMax) the files are bit-identical by construction. Where sums are reduced (Grams,
Hessians, search losses) the searched parameters are grid points and codes chosen by losses whose last bits could
depend on the summation order: FPQ is held to at most 1% of any tensor's entries differing (a near-tie decided by a
last bit; measured: none), with the perplexity equal to 4 significant digits. The named formats' Grams are summed in
float64 and rounded once, which makes their files bit-identical, GPTQ's act-order (a sort of the Hessian's diagonal)
and quantized feeding included. FlatQuant trains through rounding (straight-through), which amplifies last-bit differences of the summed gradients: on a float64 model its
matrices agree to 1e-4 (measured 1.5e-5, the float32 storage's rounding).
"""
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_llama
from safetensors import safe_open
from safetensors.torch import load_file

import main
from configs import load_config
from quant_layers.search import token_sample
from utils import distributed
from utils.calibrate import quantize
from utils.errors import UsageError
from utils.methods import ParamFile
from utils.onload import load_offloaded

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
# name: (config, windows x tokens, float64 model, exact: bit-identical, else 1% of a tensor's entries, or one
# entry, may differ)
CASES = {
    "minmax": ("MinMax_config_llama", (4, 32), False, True),
    "minmax_int": ("MinMax_INT_config_llama", (4, 32), False, True),
    "fpq_gram": ("FPQ_config_llama", (4, 32), False, False),  # 128 tokens >= 64 inputs: the Gram-matrix losses
    "fpq_direct": ("FPQ_config_llama", (4, 12), False, False),  # 48 tokens < 64 inputs: losses summed per token
    "nvfp4_gptq": ("NVFP4_GPTQ_config", (4, 32), False, True),  # in column order, on full-precision outputs
    "nvfp4_gptq_defaults": ("NVFP4_GPTQ_config", (4, 32), False, True),  # act-order, fed quantized outputs
    "nvfp4_search": ("NVFP4_search_config", (4, 32), False, True),  # sampled tokens for the input tensor scale
    "nvfp4_best": ("NVFP4_best_config", (4, 32), False, True),
    "flatquant": ("FlatQuant_config_llama", (4, 32), True, False),
    "flatquant_nvfp4": ("NVFP4_FlatQuant_config", (4, 32), True, False),  # the batch's maximum sets a tensor scale
}
OFFLOADED = "nvfp4_gptq_defaults"  # also calibrated by both ranks with their blocks onloaded from disk
NATURAL_ORDER = ("nvfp4_gptq",)  # GPTQ in column order on full-precision block outputs
# short recipes: INT 2 epochs of 2 steps of 2 windows; NVFP4 one step of 4 windows (more steps amplify last-bit
# differences through the rounded block scales: 6e-3 after 4 steps, also in float64)
FLAT_RECIPES = {"flatquant": {"epochs": 2, "cali_bsz": 2}, "flatquant_nvfp4": {"epochs": 1, "cali_bsz": 4}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def case_config(case):
    config = load_config(CASES[case][0])
    config = replace(config, search=replace(config.search, n_candidates=12, rounds=1, act_search_tokens=40))
    if case in NATURAL_ORDER:
        config = replace(config, block=replace(config.block, act_order=False), feed_quantized=False)
    if config.flat is not None:
        config = replace(config, flat=replace(config.flat, nsamples=4, **FLAT_RECIPES[case]))
    return config


def calib_ids(case):
    return torch.randint(0, 256, CASES[case][1], generator=torch.Generator().manual_seed(1))


def calibrate(case, path, windows=slice(None)):
    """Calibrate the tiny model for `case`, writing `path`; returns (model, perplexity on the calibration ids)."""
    model = tiny_llama().double() if CASES[case][2] else tiny_llama()
    ids = calib_ids(case)
    quantize(model, case_config(case), ids[windows], progress=False, files=ParamFile(path))
    with torch.no_grad():
        return model, torch.exp(model(ids, labels=ids).loss).item()


def helper_checks(rank):
    """The shard, sample and reduction helpers under a 2-process group."""
    samples = torch.arange(12).reshape(6, 2)
    assert torch.equal(distributed.local_windows(samples), samples[rank::2])
    for refused in (lambda: distributed.local_windows(samples[:5]), lambda: distributed.local_batch(3)):
        with pytest.raises(UsageError, match="divisible by 2"):
            refused()
    assert distributed.local_batch(4) == 2
    split = distributed.token_split(6, 2)  # this rank's 3 windows of 2 tokens
    assert split.total == 12 and split.positions.tolist() == [p + 2 * rank for p in (0, 1, 4, 5, 8, 9)]
    everything = torch.arange(12.0)[:, None]
    mine = token_sample(everything[split.positions], 5, seed=3, split=split)
    drawn = [None, None]
    dist.all_gather_object(drawn, mine[:, 0].tolist())
    assert sorted(drawn[0] + drawn[1]) == token_sample(everything, 5, seed=3)[:, 0].tolist()
    value = torch.tensor([1.0 + rank, -rank])
    assert distributed.reduce(value).tolist() == [3.0, -1.0]
    assert distributed.reduce(value, distributed.MAXIMUM).tolist() == [2.0, 0.0]
    assert distributed.reduce(value, distributed.MINIMUM).tolist() == [1.0, -1.0]
    assert distributed.reduce(torch.tensor([1.5], dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert distributed.total(rank + 1) == 3 and distributed.world_size() == 2 and distributed.is_main() == (rank == 0)


def refused_before_loading(root):
    """main.py under a process group: calibration windows that do not split over the ranks end the run in one
    error line (exit 2) before the model loads (main.py ends the process group on its way out)."""
    from utils import models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad --calib_size was refused")
    models.load_model = refuse
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main.main(["--quant_config", "MinMax_config_llama", "--device", "cpu", "--calib_size", "3",
                          "--ptq_param_path", str(root / "refused.safetensors")])
    assert code == 2 and err.getvalue() == ("error: 3 calibration windows do not split over 2 processes; pass a "
                                            "--calib_size (or --nsamples) divisible by 2\n")


def calibrate_offloaded(root, rank):
    """Each rank holds one block at a time, read from the same shards (its calibrated blocks in its own scratch
    folder): rank 0 writes the file of the single in-memory process."""
    model = load_offloaded(root / "shards", torch.float32, "cpu", root / f"scratch{rank}")
    quantize(model, case_config(OFFLOADED), calib_ids(OFFLOADED), progress=False,
             files=ParamFile(root / "offloaded_2.safetensors"))


def worker(rank, port, root):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        helper_checks(rank)
        perplexities = {}
        for case in CASES:
            model, perplexities[case] = calibrate(case, root / f"{case}_2.safetensors")
            torch.save(model.state_dict(), root / f"{case}_rank{rank}.pt")
        if rank == 0:
            (root / "ppl_2.json").write_text(json.dumps(perplexities))
        calibrate_offloaded(root, rank)
        refused_before_loading(root)
    finally:
        distributed.stop()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    tiny_llama().save_pretrained(root / "shards", max_shard_size="100KB")
    mp.spawn(worker, args=(free_port(), root), nprocs=WORLD)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: a matmul's summation order depends on the thread count
    try:
        perplexities = {case: calibrate(case, root / f"{case}_1.safetensors")[1] for case in CASES}
    finally:
        torch.set_num_threads(threads)
    return root, perplexities, json.loads((root / "ppl_2.json").read_text())


def metadata(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def assert_same_file(one, two, exact, atol=0.0):
    assert metadata(one).keys() == metadata(two).keys()
    a, b = load_file(one), load_file(two)
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        elif atol:
            assert torch.allclose(a[key].double(), b[key].double(), rtol=0, atol=atol), key
        else:  # a near-tie of two candidates' summed losses may go the other way: one entry, or 1 % of them
            assert (a[key] != b[key]).sum() <= max(1, 0.01 * a[key].numel()), key


@pytest.mark.parametrize("case", CASES)
def test_two_processes_write_the_single_process_file(runs, case):
    root, single, double = runs
    exact, flat = CASES[case][3], CASES[case][2]
    assert_same_file(root / f"{case}_1.safetensors", root / f"{case}_2.safetensors", exact, 1e-4 if flat else 0.0)
    if not flat:  # FlatQuant's matrix file holds its own metadata; the others the config and calibration data
        one, two = (json.loads(metadata(root / f"{case}_{n}.safetensors")["llm_fp4"]) for n in (1, 2))
        assert {k: v for k, v in one.items() if k != "versions"} == {k: v for k, v in two.items() if k != "versions"}
    assert f"{single[case]:.4g}" == f"{double[case]:.4g}"


@pytest.mark.parametrize("case", CASES)
def test_every_rank_ends_with_the_same_model(runs, case):
    root = runs[0]
    zero, one = (torch.load(root / f"{case}_rank{rank}.pt") for rank in range(WORLD))
    assert zero.keys() == one.keys() and all(torch.equal(zero[k], one[k]) for k in zero)


def test_two_processes_onloading_from_disk_write_the_single_process_file(runs):
    root = runs[0]
    assert_same_file(root / f"{OFFLOADED}_1.safetensors", root / "offloaded_2.safetensors", exact=True)
    assert sorted(p.name for p in (root / "scratch1").iterdir()) == ["block_0.safetensors", "block_1.safetensors"]


def test_the_ranks_reduce_what_they_accumulate(runs, tmp_path):
    """Rank 0's windows alone give another file: the 2-process file holds what both ranks saw."""
    root = runs[0]
    for case in ("minmax", "nvfp4_gptq"):
        calibrate(case, tmp_path / f"{case}.safetensors", windows=slice(0, None, WORLD))
        a, b = load_file(tmp_path / f"{case}.safetensors"), load_file(root / f"{case}_2.safetensors")
        assert any(not torch.equal(a[k], b[k]) for k in a), case


def test_without_a_process_group_everything_is_local():
    samples = torch.arange(6).reshape(3, 2)
    assert distributed.world_size() == 1 and distributed.is_main()
    assert distributed.local_windows(samples) is samples and distributed.local_batch(3) == 3
    value = torch.tensor([2.0])
    assert distributed.reduce(value) is value and distributed.total(5) == 5
    assert distributed.token_split(6, 2).total is None


# MinMax W4A4E4, lm_head included: FPQ's sums are covered on the tiny model above (both loss forms); on SmolLM2 a
# 2-process FPQ run costs minutes on two shared cores (README, "Data-parallel calibration", gives it bit-identical)
SMOLLM2 = ["--model_args", "pretrained=smollm2-135m-offline", "--device", "cpu", "--calib_dataset", "enwiki",
           "--calib_size", "4", "--calib_seqlen", "64", "--quant_config", "MinMax_config_llama",
           "--eval_ppl", "enwiki-heldout", "--ppl_seqlen", "128", "--ppl_limit", "2"]


def test_torchrun_on_smollm2_writes_the_single_process_file(tmp_path):
    """`torchrun --nproc_per_node 2 main.py` on the real SmolLM2 (4 windows of 64 tokens, two per rank)."""
    def args(name):
        return SMOLLM2 + ["--ptq_param_path", str(tmp_path / f"{name}.safetensors"),
                          "--output_path", str(tmp_path / name)]
    # both runs in processes of one thread each: a matmul's summation order depends on the thread count, and
    # activation maxima would differ in their last bits for that reason alone
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    for command in ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
                     "--master_port", str(free_port()), "main.py", *args("two")],
                    [sys.executable, "main.py", *args("one")]):
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    assert_same_file(tmp_path / "one.safetensors", tmp_path / "two.safetensors", exact=True)
    one, two = (json.loads((tmp_path / n / "results.json").read_text())["ppl"]["enwiki-heldout"]
                for n in ("one", "two"))
    assert one == two
    assert done.stdout.count("perplexity enwiki-heldout") == 1  # rank 0 alone reports
