"""lm-eval hand-off: task resolution, local data, summaries, the collector, and offline failures."""
import json
from pathlib import Path

import pytest

from complete_scripts import collect
from utils import lm_eval_tasks
from utils.lm_eval_tasks import TaskUnavailable

SAMPLE = Path(__file__).resolve().parent / "data" / "arc_schema_sample.jsonl"


@pytest.fixture(scope="module")
def task_manager():
    from lm_eval.tasks import TaskManager
    return TaskManager()


def test_builtin_task_is_repointed_at_a_local_file(task_manager):
    config = lm_eval_tasks.local_task_config(task_manager, "arc_easy", SAMPLE)
    assert config["task"] == "arc_easy_local" and config["dataset_path"] == "json"
    assert config["dataset_kwargs"] == {"data_files": {"test": str(SAMPLE)}}
    assert config["test_split"] == "test" and config["training_split"] is None and "dataset_name" not in config
    assert config["doc_to_choice"] == "{{choices.text}}"  # the built-in YAML's own prompt and scoring
    _, tasks = lm_eval_tasks.prepare_tasks(["arc_easy"], {"arc_easy": SAMPLE})
    docs = list(tasks["arc_easy_local"].test_docs())
    assert len(docs) == 12 and docs[2]["answerKey"] == "C"


def test_gsm8k_offline_asset_feeds_lm_evals_own_cot_task():
    data = lm_eval_tasks.parse_task_data(["gsm8k_cot=gsm8k-test"])
    _, tasks = lm_eval_tasks.prepare_tasks(["gsm8k_cot"], data)
    task = tasks["gsm8k_cot_local"]
    docs = list(task.test_docs())
    assert len(docs) == 1319 and set(docs[0]) >= {"question", "answer"}
    assert task.config.generation_kwargs["do_sample"] is False  # greedy, as the YAML says
    assert task.config.num_fewshot == 8  # the 8 exemplars written in the YAML, not drawn from the test file


def test_math500_alias_and_unknown_names(task_manager):
    assert lm_eval_tasks.resolve_tasks(["math500"], task_manager, {}) == ["minerva_math500"]
    with pytest.raises(TaskUnavailable, match="unknown task 'arc_easyy'"):
        lm_eval_tasks.resolve_tasks(["arc_easyy"], task_manager, {})
    with pytest.raises(TaskUnavailable, match="TASK=FILE"):
        lm_eval_tasks.parse_task_data(["arc_easy"])
    with pytest.raises(TaskUnavailable, match="does not exist"):
        lm_eval_tasks.parse_task_data(["arc_easy=/no/such/file.jsonl"])
    with pytest.raises(TaskUnavailable, match="groups such as mmlu"):
        lm_eval_tasks.local_task_config(task_manager, "mmlu", SAMPLE)


def test_include_path_tasks_run_from_local_yaml(tmp_path):
    data = tmp_path / "cloze.jsonl"
    data.write_text("".join(json.dumps({"context": f"Two plus {i} is", "endings": [f" {2 + i}", " blue"],
                                        "label": 0}) + "\n" for i in range(5)))
    (tmp_path / "tiny.yaml").write_text(
        "task: tiny_cloze\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{endings}}'\ndoc_to_target: '{{label}}'\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n")
    _, tasks = lm_eval_tasks.prepare_tasks(["tiny_cloze"], include_path=str(tmp_path))
    assert len(list(tasks["tiny_cloze"].test_docs())) == 5


def test_enwiki_cloze_is_built_from_held_out_articles():
    docs = [json.loads(line) for line in lm_eval_tasks.enwiki_cloze_file().read_text().splitlines()]
    assert len(docs) == 500
    for doc in docs[:50]:
        assert len(doc["endings"]) == 4 and len(set(doc["endings"])) == 4 and 0 <= doc["label"] < 4
    labels = [d["label"] for d in docs]
    assert all(labels.count(k) > 80 for k in range(4))  # the gold position is not guessable


def test_summary_keeps_paper_metrics_and_averages_the_six_tasks():
    results = {t: {"alias": t, "acc,none": 0.5, "acc_stderr,none": 0.01, "acc_norm,none": 0.6}
               for t in lm_eval_tasks.PAPER_TASKS + ("openbookqa",)}
    results["boolq"] = {"acc,none": 0.8}
    results["gsm8k_cot_local"] = {"exact_match,strict-match": 0.1, "exact_match,flexible-extract": 0.2}
    summary = lm_eval_tasks.summarize(results)
    assert summary["piqa"] == {"acc": 0.5, "acc_stderr": 0.01, "acc_norm": 0.6}
    assert summary["gsm8k_cot"] == {"exact_match/strict-match": 0.1, "exact_match/flexible-extract": 0.2}
    assert lm_eval_tasks.paper_average(summary) == pytest.approx((0.8 + 5 * 0.5) / 6)  # OpenBookQA not averaged
    del summary["winogrande"]
    assert lm_eval_tasks.paper_average(summary) is None


def write_result(folder, model, config, qbits, tasks, ppl=None):
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"model": model, "quant_config": config, "qbits": qbits,
                                                     "tasks": tasks, "ppl": ppl or {}}))


def test_collector_prints_the_paper_layout_with_differences(tmp_path, capsys):
    six = dict(zip(collect.PROTOCOLS["llmfp4"]["tasks"], [0.65, 0.74, 0.48, 0.63, 0.66, 0.34]))
    write_result(tmp_path / "a", "huggyllama/llama-7b", "FPQ_config_llama", [4, 4, 4, 2, 2, 2],
                 {t: {"acc": v, "acc_norm": v + 0.1} for t, v in six.items()})
    write_result(tmp_path / "b", "huggyllama/llama-7b", "MinMax_config_llama", [4, 8, 4, 2, 4, 2],
                 {"boolq": {"acc": 0.7}})
    assert collect.main([str(tmp_path), "--output", str(tmp_path / "t.md")]) == 0
    lines = capsys.readouterr().out.splitlines()
    fpq = next(line for line in lines if "| FPQ |" in line)
    assert "| 4/4/4 |" in fpq and "65.0 (64.2, +0.8)" in fpq and "34.0 (33.6, +0.4)" in fpq
    assert "58.3 (58.1, +0.2)" in fpq  # the six-task average beside the paper's 58.1
    minmax = next(line for line in lines if "MinMax FP" in line)
    assert "| 4/4/8 |" in minmax and "70.0 (73.0, -3.0)" in minmax and "- (77.5)" in minmax
    rows = json.loads((tmp_path / "t.json").read_text())
    assert {r["method"] for r in rows} == {"FPQ", "MinMax FP"}


def test_collector_flatquant_protocol_uses_acc_norm_where_present(tmp_path, capsys):
    tasks = {t: {"acc": 0.5, "acc_norm": 0.7} for t in ("piqa", "hellaswag", "arc_easy", "arc_challenge")}
    tasks.update({"winogrande": {"acc": 0.6}, "lambada_openai": {"acc": 0.4, "perplexity": 5.0}})
    write_result(tmp_path / "fp", "meta-llama/Meta-Llama-3-8B", "FP", None, tasks, {"wikitext2": 6.2})
    assert collect.main([str(tmp_path), "--protocol", "flatquant"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "LLaMA-3-8B" in line)
    assert "| 70.0 |" in row and "| 60.0 |" in row and "| 40.0 |" in row
    assert "63.33 (73.23, -9.90)" in row and "6.20 (6.14, +0.06)" in row
    assert collect.main([str(tmp_path / "missing")]) == 2
