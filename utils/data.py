"""Text for calibration and perplexity: hub datasets (c4, wikitext2, pile), offline assets, local files.

Offline sources (real text from registry packages, see utils/assets.py):
- `enwiki`: Wikipedia articles; even-numbered articles are the calibration split,
- `enwiki-heldout`: the odd-numbered articles, never used for calibration,
- `abcnews`: 300 ABC news articles (evaluation only).
"""
from __future__ import annotations

import bz2
import json
import random
import re
from pathlib import Path

import torch

from .assets import asset_path
from .errors import UserError

HUB_DATASETS = ("c4", "wikitext2", "pile")
OFFLINE_DATASETS = ("enwiki", "enwiki-heldout", "abcnews")


class DatasetUnavailable(UserError, RuntimeError):
    pass


# ----- offline Wikipedia -----
def _strip_wiki_markup(text: str) -> str:
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>]*/>|<ref.*?</ref>", "", text, flags=re.S)
    while True:  # innermost templates and tables first, until none is left
        stripped = re.sub(r"\{\{[^{}]*\}\}|\{\|[^{}]*?\|\}", "", text, flags=re.S)
        if stripped == text:
            break
        text = stripped
    text = re.sub(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", "", text, flags=re.I)
    text = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]|\[https?://\S+\]", r"\1", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"&nbsp;", " ", text)
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith(("|", "!", "*{", "{", "}"))]
    return "\n".join(lines)


def wikipedia_articles() -> list[str]:
    raw = bz2.open(asset_path("enwiki"), "rt", encoding="utf-8").read()
    articles = []
    for body in re.findall(r"<text[^>]*>(.*?)</text>", raw, flags=re.S):
        body = body.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&amp;", "&")
        if body.lstrip().upper().startswith("#REDIRECT"):
            continue
        text = _strip_wiki_markup(body)
        if len(text) > 200:
            articles.append(text)
    return articles


def load_documents(name: str, split: str = "train") -> list[str]:
    """Documents of a named dataset or a local .txt (blank-line separated) / .jsonl ("text" field) file."""
    if name == "enwiki":
        return wikipedia_articles()[0::2]
    if name == "enwiki-heldout":
        return wikipedia_articles()[1::2]
    if name == "abcnews":
        return [line.strip() for line in open(asset_path("abcnews"), encoding="utf-8") if line.strip()]
    check_source(name)
    return _local_documents(Path(name)) if is_local_source(name) else _hub_documents(name, split)


def is_local_source(name: str) -> bool:
    return name not in OFFLINE_DATASETS and (Path(name).suffix in (".txt", ".jsonl", ".json") or Path(name).exists())


def check_source(name: str):
    """A dataset name is known, or a path to an existing file (checked before any model is loaded)."""
    path = Path(name)
    if not is_local_source(name):
        if name not in HUB_DATASETS + OFFLINE_DATASETS:
            raise DatasetUnavailable(f"unknown dataset {name!r}: use one of {HUB_DATASETS + OFFLINE_DATASETS} "
                                     "or a path to a .txt/.jsonl file")
        return
    if not path.exists():
        raise DatasetUnavailable(f"dataset file {path} does not exist")
    if not path.is_file():
        raise DatasetUnavailable(f"dataset {path} is a folder, not a file; pass a .txt or .jsonl file")


def _local_documents(path: Path) -> list[str]:
    try:
        docs = _jsonl_texts(path) if path.suffix in (".jsonl", ".json") else \
            [d.strip() for d in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")) if d.strip()]
    except UnicodeDecodeError as error:
        raise DatasetUnavailable(f"{path} is not UTF-8 text ({error.reason}); convert it to UTF-8") from None
    if not any(doc.strip() for doc in docs):
        raise DatasetUnavailable(f"dataset file {path} holds no text")
    return docs


def _jsonl_texts(path: Path) -> list[str]:
    """The "text" field of every JSON line; a bad line is named as file:line."""
    docs = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.strip())
            except json.JSONDecodeError as error:
                raise DatasetUnavailable(f"{path}:{number}: not valid JSON ({error.msg}, column {error.colno})") \
                    from None
            if not isinstance(record, dict) or "text" not in record:
                raise DatasetUnavailable(f"{path}:{number}: each JSON line needs a 'text' field")
            if not isinstance(record["text"], str):
                raise DatasetUnavailable(f"{path}:{number}: 'text' must be a string, got "
                                         f"{type(record['text']).__name__}")
            docs.append(record["text"])
    return docs


def _hub_documents(name: str, split: str) -> list[str]:
    try:
        from datasets import load_dataset
        if name == "c4":
            shard = ("en/c4-train.00000-of-01024.json.gz" if split == "train"
                     else "en/c4-validation.00000-of-00008.json.gz")
            data = load_dataset("allenai/c4", data_files={split: shard}, split=split)
            return data["text"] if split == "train" else data["text"][:1100]
        if name == "wikitext2":
            data = load_dataset("wikitext", "wikitext-2-raw-v1", split="train" if split == "train" else "test")
            return ["\n\n".join(data["text"])]
        data = load_dataset("mit-han-lab/pile-val-backup", split="validation")
        return data["text"]
    except Exception as error:  # the hub raises many types (connection, offline mode, missing config)
        raise DatasetUnavailable(
            f"dataset {name!r} needs the Hugging Face hub and could not be loaded ({type(error).__name__}); "
            f"offline, use one of {OFFLINE_DATASETS} or a local .txt/.jsonl file") from None


# ----- token streams -----
def calibration_samples(tokenizer, name: str, count: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """`count` random windows of `seqlen` tokens, [count, seqlen], reproducible for a seed.

    Like GPTQ/LLM-FP4: pick a random document long enough for a window and a random start in it.
    When no single document is long enough, windows come from the documents joined end to end.
    """
    docs = load_documents(name, "train")
    rng = random.Random(seed)
    token_docs = [tokenizer(d, return_tensors="pt").input_ids[0] for d in docs]
    long_docs = [t for t in token_docs if t.numel() >= seqlen]
    if len(long_docs) < max(1, count // 4):
        long_docs = [torch.cat(token_docs)]
    if long_docs[0].numel() < seqlen:
        raise DatasetUnavailable(f"dataset {name!r} has only {long_docs[0].numel()} tokens; "
                                 f"--calib_seqlen {seqlen} needs more text")
    windows = []
    for _ in range(count):
        doc = long_docs[rng.randrange(len(long_docs))]
        start = rng.randint(0, doc.numel() - seqlen)  # inclusive: a doc of exactly seqlen tokens works
        windows.append(doc[start:start + seqlen])
    return torch.stack(windows)


def evaluation_tokens(tokenizer, name: str) -> torch.Tensor:
    """The evaluation split joined into one token stream, as GPTQ-style perplexity uses it."""
    docs = load_documents(name, "test")
    separator = " " if name == "c4" else "\n\n"
    return tokenizer(separator.join(docs), return_tensors="pt").input_ids[0]
