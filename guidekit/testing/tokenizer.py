"""An offline CLIP-style BPE tokenizer with a chosen vocabulary (no hub download)."""

from __future__ import annotations

import json
import os
import string
from typing import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTokenizer

__all__ = ["build_clip_tokenizer", "DEFAULT_WORDS"]

#: Words that become single tokens in the default tiny tokenizer; anything else is spelled out.
DEFAULT_WORDS = (
    "a an the of on in with and photo picture painting drawing image style "
    "red yellow green cyan blue magenta orange purple pink white black grey gray brown "
    "circle square triangle shape background striped dotted plain cat dog car tree house "
    "astronaut horse riding mountain sky sea city portrait landscape high quality detailed"
).split()


def build_clip_tokenizer(words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose vocabulary holds every printable character plus `words` as whole tokens.

    The merges are learned here with the `tokenizers` BPE trainer on `words` alone, so no network is
    needed. Unknown words are split into smaller pieces, so free text always tokenizes.
    """
    words = list(dict.fromkeys(w.lower() for w in words))
    alphabet = list(string.ascii_lowercase + string.digits + string.punctuation)
    model = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,  # large enough that every word ends as one token
        min_frequency=1,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    model.train_from_iterator(words, trainer=trainer)
    state = json.loads(model.to_str())["model"]
    vocab = dict(state["vocab"])
    for ch in alphabet:  # single characters at the end of a word, for free text
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def save_clip_tokenizer(folder: str | os.PathLike, words: Iterable[str] = DEFAULT_WORDS) -> CLIPTokenizer:
    tok = build_clip_tokenizer(words)
    tok.save_pretrained(str(folder))
    return tok
