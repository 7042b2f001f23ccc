"""A tiny model saved as a folder with a character tokenizer, so campaigns and the CLI can load it.

The tokenizer maps each printable ASCII character to one id (3..97) below the tiny models'
vocabulary size, with ids 0, 1 and 2 for padding, beginning and end of sequence.
"""

from __future__ import annotations

import json

import string
from pathlib import Path

from tests.tiny_models import make_tiny_model

SPECIALS = {"<pad>": 0, "<s>": 1, "</s>": 2}
CHARACTERS = string.printable[:95]  # digits, letters, punctuation, space, tab, newline ...


def make_char_tokenizer():
    """Return a PreTrainedTokenizerFast that encodes one id per character."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = dict(SPECIALS)
    for index, character in enumerate(CHARACTERS):
        vocab.setdefault(character, 3 + index)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    # Split into single characters and keep them all, whitespace included.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<pad>"
    )
    tokenizer.padding_side = "left"
    return tokenizer


def save_tiny_model_folder(folder: Path, arch: str = "llama", seed: int = 0) -> Path:
    """Save a tiny random model and the character tokenizer into ``folder``; return it."""
    folder.mkdir(parents=True, exist_ok=True)
    model = make_tiny_model(arch, seed=seed)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(folder)
    make_char_tokenizer().save_pretrained(folder)
    return folder


def records_without_timing(folder: Path) -> list[dict]:
    """Return the folder's trial records without their timing fields, for exact comparison."""
    records = []
    for line in (folder / "trials.jsonl").read_text().splitlines():
        record = json.loads(line)
        record.pop("seconds", None)
        records.append(record)
    return records


def summary_without_timing(folder: Path) -> dict:
    """Return the folder's summary without its measured time ratios."""
    summary = json.loads((folder / "summary.json").read_text())
    for arm in summary["arms"]:
        arm["overhead"].pop("time_ratio", None)
    return summary
