"""Bad files are refused in one line that names the file (and line) and what is wrong with it."""
import json

import pytest
from cli_helpers import forbid_model_load, load_tiny_model_instead, one_line_error, run_main

CALIBRATE = ["--quant_config", "MinMax_config_llama", "--calib_size", "2", "--calib_seqlen", "16", "--device", "cpu"]


def calibrate_on(capsys, monkeypatch, path):
    load_tiny_model_instead(monkeypatch)
    code, _, err = run_main(capsys, *CALIBRATE, "--calib_dataset", path)
    assert code == 2
    return one_line_error(err)


@pytest.mark.parametrize("name, content", [
    ("empty.txt", ""), ("blank.txt", "  \n\n\t \n"), ("empty.jsonl", "\n"), ("blank.jsonl", '{"text": "  "}\n')])
def test_a_calibration_file_without_text_is_named(capsys, monkeypatch, tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    assert f"dataset file {path} holds no text" in calibrate_on(capsys, monkeypatch, path)


@pytest.mark.parametrize("name", ["latin1.txt", "latin1.jsonl"])
def test_a_file_that_is_not_utf8_is_named(capsys, monkeypatch, tmp_path, name):
    path = tmp_path / name
    text = "caf\u00e9 au lait " * 50
    path.write_bytes((json.dumps({"text": text}, ensure_ascii=False) if name.endswith("jsonl") else text)
                     .encode("latin-1"))
    assert f"{path} is not UTF-8 text" in calibrate_on(capsys, monkeypatch, path)


@pytest.mark.parametrize("bad_line, message", [
    ('{"text": "unfinished', "not valid JSON (Unterminated string"),
    ('{"text": 42}', "'text' must be a string, got int"),
    ('{"text": ["a", "b"]}', "'text' must be a string, got list"),
    ('42', "each JSON line needs a 'text' field"),
])
def test_a_bad_jsonl_line_is_named_as_file_and_line(capsys, monkeypatch, tmp_path, bad_line, message):
    path = tmp_path / "data.jsonl"
    good = json.dumps({"text": "w1 w2 w3 " * 20})
    path.write_text(f"{good}\n\n{bad_line}\n{good}\n")
    assert f"{path}:3: {message}" in calibrate_on(capsys, monkeypatch, path)


def test_a_missing_calibration_file_is_refused_before_loading(capsys, monkeypatch, tmp_path):
    forbid_model_load(monkeypatch)
    code, _, err = run_main(capsys, *CALIBRATE, "--calib_dataset", tmp_path / "none.txt")
    assert code == 2 and f"dataset file {tmp_path / 'none.txt'} does not exist" in one_line_error(err)


@pytest.mark.parametrize("flag", ["--calib_dataset", "--eval_ppl"])
def test_an_unknown_dataset_name_is_refused_before_loading(capsys, monkeypatch, flag):
    forbid_model_load(monkeypatch)
    code, _, err = run_main(capsys, *CALIBRATE, flag, "wikitext103")
    assert code == 2 and "unknown dataset 'wikitext103'" in one_line_error(err)


@pytest.mark.parametrize("content, reason", [("{\"model\": ", "Expecting value at line 1"),
                                             ("[1, 2]", "not a JSON object")])
def test_a_corrupt_results_file_in_the_output_folder_is_named(capsys, monkeypatch, tmp_path, content, reason):
    forbid_model_load(monkeypatch)
    (tmp_path / "results.json").write_text(content)
    code, _, err = run_main(capsys, "--fp_only", "--device", "cpu", "--output_path", tmp_path)
    line = one_line_error(err)
    assert code == 2 and f"{tmp_path / 'results.json'} is not a results file ({reason}" in line


TASK_YAML = """task: local_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{endings}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def run_task(capsys, monkeypatch, include_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    forbid_model_load(monkeypatch)
    code, _, err = run_main(capsys, "--fp_only", "--device", "cpu", "--tasks", "local_cloze",
                            "--include_path", include_path)
    assert code == 2
    return one_line_error(err)


def test_an_include_yaml_with_a_syntax_error_is_named(capsys, monkeypatch, tmp_path):
    broken = TASK_YAML.format(data=tmp_path / "d.jsonl").replace("output_type: multiple_choice",
                                                                 "output_type: multiple_choice: twice")
    (tmp_path / "task.yaml").write_text(broken)
    line = run_task(capsys, monkeypatch, tmp_path)
    assert f"{tmp_path / 'task.yaml'} is not valid YAML (mapping values are not allowed here at line 7" in line


def test_a_missing_include_folder_is_named(capsys, monkeypatch, tmp_path):
    line = run_task(capsys, monkeypatch, tmp_path / "no_such_folder")
    assert f"--include_path {tmp_path / 'no_such_folder'} is not an existing folder" in line


def test_a_missing_local_data_file_of_a_task_is_named_not_the_hub(capsys, monkeypatch, tmp_path):
    (tmp_path / "task.yaml").write_text(TASK_YAML.format(data=tmp_path / "gone.jsonl"))
    line = run_task(capsys, monkeypatch, tmp_path)
    assert f"its data file {tmp_path / 'gone.jsonl'}" in line and "does not exist" in line and "hub" not in line
