"""--tasks through EleutherAI lm-eval 0.4 on the in-memory (fake-quantized) model.

Task names are lm-eval's own (hub data). Offline, `--task_data NAME=FILE` points a built-in task's YAML at
a local file of the same schema (FILE may also name an offline asset, e.g. `gsm8k_cot=gsm8k-test`), and
`--include_path` adds YAML tasks; `enwiki_cloze` is a multiple-choice task built from held-out Wikipedia.
"""
from __future__ import annotations

import json
import random
import re
import time
import warnings
from pathlib import Path

from .assets import ASSETS, asset_path, cache_dir
from .errors import UserError
from .onload import onloaded_on_call

# LLM-FP4 Table 1 averages `acc` over these six (OpenBookQA is run by its scripts but not averaged).
PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge")
ALIASES = {"math500": "minerva_math500"}
LOCAL_SUFFIX = "_local"
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")  # datasets' builders of files named in data_files


class TaskUnavailable(UserError, ValueError):
    pass


def parse_task_data(pairs: list[str] | None) -> dict[str, Path]:
    """NAME=FILE pairs of --task_data; FILE is a path or an offline asset name (e.g. gsm8k-test)."""
    data = {}
    for pair in pairs or []:
        name, sep, target = pair.partition("=")
        if not sep or not name or not target:
            raise TaskUnavailable(f"--task_data takes TASK=FILE, got {pair!r}")
        path = asset_path(target) if target in ASSETS else Path(target).expanduser().resolve()
        if not path.exists():
            raise TaskUnavailable(f"--task_data {name}: {path} does not exist")
        data[ALIASES.get(name, name)] = path
    return data


# ----- tasks on local data -----
def local_task_config(task_manager, name: str, path: Path) -> dict:
    """The YAML of built-in task `name`, re-pointed at a local .jsonl/.json/.csv file with a test split."""
    from lm_eval.tasks._yaml_loader import load_yaml
    entry = task_manager.task_index.get(name)
    if entry is None or entry.kind.name != "TASK" or not str(entry.yaml_path).endswith(".yaml"):
        raise TaskUnavailable(f"--task_data {name}: not a single lm-eval YAML task (groups such as mmlu need "
                              "--include_path with local YAMLs)")
    config = load_yaml(str(entry.yaml_path), resolve_func=True, recursive=True)
    builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(path.suffix)
    if builder is None:
        raise TaskUnavailable(f"--task_data {name}: {path} must be .jsonl, .json, .csv or .parquet")
    config.update(task=name + LOCAL_SUFFIX, dataset_path=builder, dataset_kwargs={"data_files": {"test": str(path)}},
                  test_split="test", training_split=None, validation_split=None)
    config.pop("dataset_name", None)
    config.pop("tag", None)
    if config.get("fewshot_split"):  # shots would come from the test file itself
        config.pop("fewshot_split")
    return config


def _cloze_sentences(text: str) -> list[str]:
    sentences = re.split(r"(?<=[.!?])\s+", text.replace("\n", " "))
    return [s for s in sentences if 12 <= len(s.split()) <= 40 and not re.search(r"[|{}=<>]", s)]


def enwiki_cloze_file(count: int = 500, seed: int = 0) -> Path:
    """A 4-way sentence-completion task from held-out Wikipedia articles (never used for calibration):
    the first 60% of a sentence, its true ending and three endings of sentences from other articles."""
    from .data import load_documents
    path = cache_dir() / "tasks" / f"enwiki_cloze_{count}_{seed}.jsonl"
    if path.exists():
        return path
    rng = random.Random(seed)
    by_article = [_cloze_sentences(doc) for doc in load_documents("enwiki-heldout")]
    pool = [(a, s) for a, sentences in enumerate(by_article) for s in sentences]
    rng.shuffle(pool)

    def split(sentence):
        words = sentence.split()
        cut = max(4, int(len(words) * 0.6))
        return " ".join(words[:cut]), " " + " ".join(words[cut:])
    docs = []
    for article, sentence in pool[:count]:
        context, ending = split(sentence)
        others = [split(s)[1] for a, s in rng.sample(pool, 12) if a != article]
        endings = list(dict.fromkeys(others))[:3]
        label = rng.randrange(4)
        endings.insert(label, ending)
        docs.append({"context": context, "endings": endings, "label": label})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def enwiki_cloze_config() -> dict:
    return {"task": "enwiki_cloze", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(enwiki_cloze_file())}}, "test_split": "test",
            "output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "{{endings}}",
            "doc_to_target": "{{label}}", "target_delimiter": "",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0}}


OFFLINE_TASKS = {"enwiki_cloze": enwiki_cloze_config}


# ----- resolving and running -----
def resolve_tasks(names: list[str], task_manager, task_data: dict[str, Path]) -> list:
    """lm-eval task specs: registered names, or config dicts for local data; unknown names fail here."""
    specs = []
    for raw in names:
        name = ALIASES.get(raw, raw)
        if name in task_data:
            specs.append(local_task_config(task_manager, name, task_data[name]))
        elif name in OFFLINE_TASKS:
            specs.append(OFFLINE_TASKS[name]())
        elif name in task_manager.all_tasks or Path(name).suffix == ".yaml":
            specs.append(name)
        else:
            raise TaskUnavailable(f"unknown task {raw!r}: not an lm-eval task (see `lm-eval ls tasks`), not in "
                                  f"--include_path and not one of {sorted(OFFLINE_TASKS)}")
    return specs


def build_tasks(specs: list, task_manager, offline: bool) -> dict:
    """Task objects, one spec at a time so that a task whose data cannot be had is named in the error."""
    from lm_eval.tasks import get_task_dict
    tasks = {}
    for spec in specs:
        name = spec["task"] if isinstance(spec, dict) else spec
        try:
            with warnings.catch_warnings():  # 0.4.13 prefers TaskManager.load(), which 0.4.9 lacks
                warnings.simplefilter("ignore", DeprecationWarning)
                tasks.update(get_task_dict([spec], task_manager))
        except Exception as error:  # the datasets library raises many types for missing data
            where = "the Hugging Face hub is unreachable" if offline else f"{type(error).__name__}: {str(error)[:120]}"
            raise TaskUnavailable(
                f"task {name!r} could not load its data ({where}); supply it locally with --task_data "
                f"{name}=FILE.jsonl (the same fields as the hub dataset) or --include_path DIR with a YAML task "
                "whose dataset_kwargs.data_files is an absolute path") from None
    return tasks


def _lm_eval():
    try:
        import lm_eval
        return lm_eval
    except ImportError:
        raise TaskUnavailable("--tasks needs lm-eval: pip install 'lm_eval[hf]>=0.4.9,<0.5'") from None


def prepare_tasks(names: list[str], task_data: dict[str, Path] | None = None, include_path=None,
                  offline: bool = False) -> tuple:
    """(task manager, {name: task}) with every task's data loaded: run before calibrating, so a task that
    cannot be had fails at once instead of after the calibration."""
    _lm_eval()
    from lm_eval.tasks import TaskManager
    if include_path is not None:
        check_include_path(Path(include_path))
    task_manager = TaskManager(include_path=include_path)
    specs = resolve_tasks(names, task_manager, task_data or {})
    for spec in specs:
        check_data_files(spec, task_manager)
    return task_manager, build_tasks(specs, task_manager, offline)


def check_include_path(folder: Path):
    """The folder exists and each YAML in it parses: lm-eval skips a YAML it cannot read, and its task would
    then be reported as unknown."""
    import yaml
    if not folder.is_dir():
        raise TaskUnavailable(f"--include_path {folder} is not an existing folder")
    for path in sorted([*folder.rglob("*.yaml"), *folder.rglob("*.yml")]):
        try:
            list(yaml.compose_all(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader))  # syntax only
        except UnicodeDecodeError as error:
            raise TaskUnavailable(f"--include_path: {path} is not UTF-8 text ({error.reason})") from None
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise TaskUnavailable(f"--include_path: {path} is not valid YAML "
                                  f"({getattr(error, 'problem', None) or type(error).__name__}{where})") from None


def check_data_files(spec, task_manager):
    """Local data files a task names (dataset_kwargs.data_files) must exist, so that a missing one is not
    reported as an unreachable hub."""
    from lm_eval.tasks._yaml_loader import load_yaml
    if isinstance(spec, dict):
        config = spec
    else:
        entry = task_manager.task_index.get(spec)
        if entry is None or not str(entry.yaml_path).endswith(".yaml"):
            return
        config = load_yaml(str(entry.yaml_path), resolve_func=False, recursive=True)
    if config.get("dataset_path") not in LOCAL_BUILDERS:  # a hub dataset's data_files lie in its repository
        return
    files = (config.get("dataset_kwargs") or {}).get("data_files") or []
    files = files.values() if isinstance(files, dict) else [files]
    for group in files:
        for name in [group] if isinstance(group, str) else group:
            if not any(c in name for c in "*?[") and "://" not in name and not Path(name).expanduser().exists():
                task = config.get("task", spec)
                raise TaskUnavailable(f"task {task!r}: its data file {name} (dataset_kwargs.data_files) does not exist")


def evaluate_tasks(model, tokenizer, prepared: tuple, *, num_fewshot=None, limit=None, batch_size="1",
                   device=None, model_args=None, gen_kwargs=None, log_samples=False) -> dict:
    """Run lm-eval on the in-memory model. Returns {"summary": {task: metrics}, "average": paper average,
    "output": lm-eval's full output, "seconds": wall time}."""
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM
    task_manager, tasks = prepared
    batch = batch_size if str(batch_size).startswith("auto") else int(batch_size)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch, device=str(device or model.device),
              **(model_args or {}))
    started = time.perf_counter()
    with onloaded_on_call(model):
        output = lm_eval.simple_evaluate(model=lm, tasks=list(tasks.values()), num_fewshot=num_fewshot, limit=limit,
                                         task_manager=task_manager, gen_kwargs=gen_kwargs, log_samples=log_samples)
    seconds = time.perf_counter() - started
    summary = summarize(output["results"])
    return {"summary": summary, "average": paper_average(summary), "output": output, "seconds": seconds}


def summarize(results: dict) -> dict:
    """{task: {metric: value}} from lm-eval's results; 'metric,filter' keys become 'metric' for the default
    filter and 'metric/filter' otherwise; stderr values are kept beside their metric."""
    summary = {}
    for task, metrics in results.items():
        name = task[:-len(LOCAL_SUFFIX)] if task.endswith(LOCAL_SUFFIX) else task
        entry = {}
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or "," not in key:
                continue
            metric, filter_name = key.split(",", 1)
            entry[metric if filter_name == "none" else f"{metric}/{filter_name}"] = value
        if entry:
            summary[name] = entry
    return summary


def paper_average(summary: dict) -> float | None:
    """Mean `acc` over LLM-FP4's six commonsense tasks, as its tables (None unless all six ran)."""
    if not all(task in summary and "acc" in summary[task] for task in PAPER_TASKS):
        return None
    return sum(summary[task]["acc"] for task in PAPER_TASKS) / len(PAPER_TASKS)
