"""Shared by the tests of user errors: run main.main in-process and read its one-line error, with the model
loader replaced so that a check meant to run before loading proves it did (or a tiny model stands in)."""
import main
from conftest import tiny_llama


def run_main(capsys, *args):
    code = main.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err: str) -> str:
    """The message of main.py's error line; fails unless stderr is exactly that one line."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def forbid_model_load(monkeypatch):
    from utils import models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")
    monkeypatch.setattr(models, "load_model", refuse)


def tiny_tokenizer():
    """A word-level tokenizer of 256 ids (every unknown word is id 0), enough to tokenize any text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, 256)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")


def load_tiny_model_instead(monkeypatch):
    """main.py gets a tiny random Llama (128 positions) whatever --model_args names; returns its calls."""
    from utils import models
    calls = []

    def load(*args, **kwargs):
        calls.append(args)
        return tiny_llama(), tiny_tokenizer()
    monkeypatch.setattr(models, "load_model", load)
    return calls
