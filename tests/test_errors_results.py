"""Class 1 of the bad-input review: nothing silently wrong. Non-finite weights are refused at load, every
quantizer of a parameter file is checked against the model and the config (whatever its metadata claims),
and a NaN perplexity or metric is an error, never a result."""
import json
import math
from dataclasses import replace

import pytest
import torch
from conftest import tiny_llama
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_folder import save_tiny_model

import main
from configs import load_config
from quant_layers import QuantEmbedding
from utils.calibrate import prepare_model, quant_modules, quantize
from utils.evaluation import perplexity
from utils.models import NonFiniteWeights, load_model
from utils.params import ParamFileError, load_params, save_params
from utils.report import NonFiniteResult, check_finite_results

QBITS = [4, 4, 4, 2, 2, 2]


def small(name="FPQ_config_llama"):
    config = load_config(name)
    return replace(config, search=replace(config.search, n_candidates=6, rounds=1))


def poison(model):
    model.model.layers[1].mlp.up_proj.weight[3, 7] = float("nan")


def test_non_finite_weight_is_refused_at_load_naming_the_tensor(tmp_path):
    folder = save_tiny_model(tmp_path / "model", poison)
    with pytest.raises(NonFiniteWeights, match="weight model.layers.1.mlp.up_proj.weight holds 1 NaN"):
        load_model(folder, "float32", "cpu")


def test_non_finite_weight_in_the_cli_is_one_line_before_calibration(tmp_path, capsys):
    folder = save_tiny_model(tmp_path / "model", poison)
    code = main.main(["--model_args", f"pretrained={folder}", "--device", "cpu", "--calib_dataset", "enwiki",
                      "--ptq_param_path", str(tmp_path / "p.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "calibrating" not in err
    assert err.strip().splitlines()[-1].startswith("error: model ") and "model.layers.1.mlp.up_proj.weight" in err
    assert not (tmp_path / "p.safetensors").exists()


@pytest.fixture(scope="module")
def param_file(tmp_path_factory):
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    model = tiny_llama()
    quantize(model, small(), ids, progress=False)
    return save_params(tmp_path_factory.mktemp("params") / "p.safetensors", model, small(), "tiny")


def edited(source, target, edit_tensors=None, edit_meta=None):
    """A copy of parameter file `source` with its tensors and / or metadata changed."""
    tensors = load_file(str(source))
    with safe_open(str(source), "pt") as f:
        meta = json.loads(f.metadata()["llm_fp4"])
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, str(target), metadata={"llm_fp4": json.dumps(meta)})
    return target


def fresh(config):
    model = tiny_llama()
    prepare_model(model, config)
    return model


BIAS = "model.layers.0.self_attn.q_proj.weight_quantizer.bias"
ACT = "model.layers.1.mlp.down_proj.act_quantizer.bias"
SHIFT = "model.layers.0.mlp.gate_proj.input_shift"


def set_nan(tensors):
    tensors[BIAS][2] = float("nan")


def set_inf_act(tensors):
    tensors[ACT] = torch.full_like(tensors[ACT], float("inf"))  # the folded pre-shift's one tensor bias


def set_nan_shift(tensors):
    tensors[SHIFT][1] = float("nan")


def drop(tensors):
    del tensors[ACT]


def reshape(tensors):
    tensors[BIAS] = torch.zeros(tensors[BIAS].shape[0] + 1, 1)


def to_int(tensors):
    tensors[BIAS] = tensors[BIAS].round().to(torch.int32)


@pytest.mark.parametrize("edit, message", [
    (set_nan, f"{BIAS} holds NaN or infinite values"),
    (set_inf_act, f"{ACT} holds NaN or infinite values"),
    (set_nan_shift, f"{SHIFT} holds NaN or infinite values"),
    (drop, f"has no tensor {ACT}"),
    (reshape, f"{BIAS} has shape \\(65, 1\\), which does not fit"),
    (to_int, f"{BIAS} has dtype torch.int32"),
])
def test_bad_tensor_in_a_parameter_file_is_named(param_file, tmp_path, edit, message):
    path = edited(param_file, tmp_path / "bad.safetensors", edit_tensors=edit)
    with pytest.raises(ParamFileError, match=message):
        load_params(path, fresh(small()), small())


def test_metadata_edited_to_claim_other_qbits_is_refused(param_file, tmp_path):
    claimed = [4, 8, 4, 2, 4, 2]

    def claim(meta):
        meta["qbits"] = claimed
        meta["config"]["a_bits"], meta["config"]["a_exp"] = 8, 4
    path = edited(param_file, tmp_path / "claims.safetensors", edit_meta=claim)
    config = small().with_qbits(claimed)
    with pytest.raises(ParamFileError, match="act_quantizer holds 4-bit values where --qbits asks for 8"):
        load_params(path, fresh(config), config)


def test_untouched_parameter_file_still_loads(param_file):
    load_params(param_file, fresh(small()), small())


def reference_state(model, a_bias=True):
    """A parameter file in the reference code's layout (FPQ: per-channel a_bias), E2M1 everywhere."""
    state = {}
    for name, module in quant_modules(model).items():
        if isinstance(module, QuantEmbedding):
            state.update({f"{name}.exponent_bit": torch.tensor(2), f"{name}.mantissa_bit": torch.tensor(1),
                          f"{name}.interval": torch.full((module.num_embeddings, 1, 1, 1), 2.0)})
            continue
        state.update({f"{name}.w_exponent_bit": torch.tensor(2), f"{name}.w_mantissa_bit": torch.tensor(1),
                      f"{name}.a_exponent_bit": torch.tensor(2), f"{name}.a_mantissa_bit": torch.tensor(1),
                      f"{name}.w_interval": torch.full((module.out_features, 1, 1, 1), 3.0),
                      f"{name}.a_interval": torch.full((1, 1), 1.5)})
        if a_bias:
            state[f"{name}.a_bias"] = torch.full((module.in_features, 1), 2.0)
    return state


@pytest.mark.parametrize("config_name, qbits, edit, message", [
    ("MinMax_config_llama", QBITS, None, "pass --quant_config FPQ_config_llama"),
    ("FPQ_config_llama", [4, 8, 4, 2, 4, 2], None, "holds W4A4E4 parameters, not W4A8E4"),
    ("FPQ_config_llama", QBITS, ("model.layers.0.mlp.up_proj.a_bias", float("nan")), "non-finite"),
    ("FPQ_config_llama", QBITS, ("model.layers.1.self_attn.o_proj.w_interval", torch.int64), "dtype torch.int64"),
    ("FPQ_config_llama", QBITS, ("model.layers.0.mlp.down_proj.w_exponent_bit", torch.tensor([2, 2])),
     "w_exponent_bit is not one whole number of bits"),
])
def test_reference_file_is_checked_against_config_qbits_and_its_tensors(tmp_path, config_name, qbits, edit, message):
    config = load_config(config_name).with_qbits(qbits)
    model = fresh(config)
    state = reference_state(model)
    if edit and isinstance(edit[1], float):
        state[edit[0]][0] = edit[1]
    elif edit and torch.is_tensor(edit[1]):
        state[edit[0]] = edit[1]
    elif edit:
        state[edit[0]] = state[edit[0]].to(edit[1])
    torch.save(state, tmp_path / "reference.pt")
    with pytest.raises(ParamFileError, match=message):
        load_params(tmp_path / "reference.pt", model, config)


def test_non_finite_perplexity_is_an_error_naming_the_dataset():
    model = tiny_llama()
    with torch.no_grad():
        model.model.norm.weight.fill_(1e38)  # finite weights whose logits overflow
    tokens = torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(0))
    with pytest.raises(NonFiniteResult, match="perplexity on abcnews is nan"):
        perplexity(model, tokens, seqlen=32, progress=False, desc="abcnews")


def test_non_finite_lm_eval_metric_is_an_error_naming_the_task():
    result = {"ppl": {"enwiki-heldout": 31.6},
              "tasks": {"arc_easy": {"acc": 0.5, "acc_stderr": math.nan}, "gsm8k_cot": {"exact_match": math.nan}}}
    with pytest.raises(NonFiniteResult, match="lm-eval task gsm8k_cot, metric exact_match, is nan"):
        check_finite_results(result)
    del result["tasks"]["gsm8k_cot"]
    check_finite_results(result)  # a NaN standard error (one example) is no result of its own
