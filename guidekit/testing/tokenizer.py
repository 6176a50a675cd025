"""An offline CLIP-style BPE tokenizer with a chosen vocabulary (no hub download)."""

from __future__ import annotations

import os
import string
from collections import Counter
from typing import Iterable

from transformers import CLIPTokenizer

__all__ = ["build_clip_tokenizer", "learn_bpe_merges", "DEFAULT_WORDS"]

#: Words that become single tokens in the default tiny tokenizer; anything else is spelled out.
DEFAULT_WORDS = (
    "a an the of on in with and photo picture painting drawing image style "
    "red yellow green cyan blue magenta orange purple pink white black grey gray brown "
    "circle square triangle shape background striped dotted plain cat dog car tree house "
    "astronaut horse riding mountain sky sea city portrait landscape high quality detailed"
).split()

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def _merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def learn_bpe_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Greedy BPE on `words` until each is one token (CLIP style: the last symbol carries `</w>`).

    Ties between equally frequent pairs go to the lexicographically smallest pair, so the same words
    always give the same merges (and token ids), in any process.
    """
    corpus = [list(w[:-1]) + [w[-1] + "</w>"] for w in words if w]
    merges: list[tuple[str, str]] = []
    while any(len(symbols) > 1 for symbols in corpus):
        counts = Counter(pair for symbols in corpus for pair in zip(symbols, symbols[1:]))
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        corpus = [_merge(symbols, best) for symbols in corpus]
    return merges


def build_clip_tokenizer(words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose vocabulary holds every printable character plus `words` as whole tokens.

    The merges are learned here on `words` alone (deterministically), so no network is needed. Unknown
    words are split into smaller pieces, so free text always tokenizes.
    """
    words = list(dict.fromkeys(w.lower() for w in words))
    vocab: dict[str, int] = {}
    for token in SPECIAL_TOKENS:
        vocab.setdefault(token, len(vocab))
    for ch in string.ascii_lowercase + string.digits + string.punctuation:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = learn_bpe_merges(words)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def save_clip_tokenizer(folder: str | os.PathLike, words: Iterable[str] = DEFAULT_WORDS) -> CLIPTokenizer:
    tok = build_clip_tokenizer(words)
    tok.save_pretrained(str(folder))
    return tok
