"""A tiny random Llama saved as a model folder with a byte-level tokenizer of 256 tokens, so main.py can run
on it end to end in seconds (`--model_args pretrained=FOLDER`)."""
from pathlib import Path

import torch
from conftest import tiny_llama


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE({char: index for index, char in enumerate(alphabet)}, []))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def save_tiny_model(folder: Path, change=None) -> str:
    """Write the model (after `change(model)`, if given) and the tokenizer to `folder`; returns its path."""
    model = tiny_llama()
    if change is not None:
        with torch.no_grad():
            change(model)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return str(folder)
