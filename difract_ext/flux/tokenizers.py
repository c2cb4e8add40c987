"""Offline, deterministic word-level tokenizers for tiny FLUX pipelines.

FLUX uses two tokenizers: a CLIP BPE tokenizer (``tokenizer``) and a T5 tokenizer
(``tokenizer_2``). The builders here write tokenizer files for a closed vocabulary so that
every vocabulary word is exactly one token, without touching the Hugging Face hub:

* :func:`build_clip_tokenizer` writes ``vocab.json`` + ``merges.txt`` (a real byte-level BPE
  whose merge list collapses each word to one token) and loads them as ``CLIPTokenizer``.
* :func:`build_t5_tokenizer` writes a ``tokenizers`` WordLevel model as ``tokenizer.json``
  (lower-casing, whitespace/punctuation split, ``</s>`` appended) and loads it as
  ``T5TokenizerFast``.

Both are saved with ``save_pretrained`` by a pipeline and reload with ``from_pretrained``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

from transformers import CLIPTokenizer, T5TokenizerFast

from difract_ext.util.atomic import atomic_write_bytes

logger = logging.getLogger(__name__)

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"

__all__ = ["build_clip_tokenizer", "build_t5_tokenizer", "normalize_words"]


def normalize_words(words: Iterable[str]) -> list[str]:
    """Lower-case, de-duplicate and sort a vocabulary (deterministic order).

    Raises:
        ValueError: if a word is empty or is not purely alphabetic (the tokenizers split on
            anything else).
    """
    out = sorted({w.strip().lower() for w in words})
    for w in out:
        if not w or not w.isalpha() or not w.isascii():
            raise ValueError(f"vocabulary words must be non-empty ASCII letters, got {w!r}")
    return out


def _bpe_split(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply CLIP's BPE rule (repeatedly merge the lowest-ranked adjacent pair) to one word."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        pairs = [(r, i) for r, i in pairs if r is not None]
        if not pairs:
            break
        rank, _ = min(pairs)
        a, b = next((a, b) for a, b in zip(parts, parts[1:]) if ranks.get((a, b)) == rank)
        merged: list[str] = []
        i = 0
        while i < len(parts):
            if i < len(parts) - 1 and parts[i] == a and parts[i + 1] == b:
                merged.append(a + b)
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def _clip_merges(words: list[str]) -> list[tuple[str, str]]:
    """A merge list under which each word BPE-encodes to a single ``word</w>`` token.

    Starts from left-to-right prefix merges, then, while some word still ends in several
    pieces, appends the merge of its first adjacent pair. An appended merge has the highest
    rank, so it only fires where a word was stuck: words already collapsed stay collapsed and
    the loop terminates (each pass shortens at least one word).
    """
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()

    def add(pair: tuple[str, str]) -> None:
        if pair not in seen:
            seen.add(pair)
            merges.append(pair)

    for w in words:
        prefix = w[0] if len(w) > 1 else w + "</w>"
        for k in range(1, len(w)):
            nxt = w[k] + ("</w>" if k == len(w) - 1 else "")
            add((prefix, nxt))
            prefix = prefix + nxt
    for _ in range(10_000):
        ranks = {p: i for i, p in enumerate(merges)}
        stuck = [(w, s) for w in words if len(s := _bpe_split(w, ranks)) > 1]
        if not stuck:
            return merges
        _, parts = stuck[0]
        add((parts[0], parts[1]))
    raise RuntimeError("could not build a BPE merge list")  # pragma: no cover


def build_clip_tokenizer(
    words: Iterable[str], out_dir: str | Path, max_length: int = 16
) -> CLIPTokenizer:
    """Write and load a CLIP BPE tokenizer whose vocabulary words are single tokens.

    Ids: 0 = ``<|startoftext|>``, 1 = ``<|endoftext|>`` (also the pad token, as in CLIP),
    then the 26 letters with and without ``</w>``, then merged pieces, in a deterministic order.
    Out-of-vocabulary words still tokenize (into letters/pieces).

    Args:
        words: the closed vocabulary (ASCII letters; case-insensitive).
        out_dir: folder to write ``vocab.json`` / ``merges.txt`` into (created).
        max_length: ``model_max_length`` (the CLIP text model's ``max_position_embeddings``).

    Returns:
        the loaded tokenizer (``len(tok)`` is the vocabulary size for ``CLIPTextConfig``).
    """
    vocab_words = normalize_words(words)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merges = _clip_merges(vocab_words)
    tokens = [CLIP_BOS, CLIP_EOS]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens += letters + [c + "</w>" for c in letters]
    for a, b in merges:
        tokens.append(a + b)
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    atomic_write_bytes(out / "vocab.json", json.dumps(vocab, indent=0, ensure_ascii=True).encode())
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    atomic_write_bytes(out / "merges.txt", ("\n".join(lines) + "\n").encode())
    tok = CLIPTokenizer(
        vocab_file=str(out / "vocab.json"),
        merges_file=str(out / "merges.txt"),
        model_max_length=max_length,
        bos_token=CLIP_BOS,
        eos_token=CLIP_EOS,
        pad_token=CLIP_EOS,
        unk_token=CLIP_EOS,
    )
    bad = [w for w in vocab_words if len(tok.tokenize(w)) != 1]
    if bad:  # pragma: no cover - guarded by _clip_merges
        raise RuntimeError(f"CLIP tokenizer splits vocabulary words: {bad}")
    return tok


def build_t5_tokenizer(
    words: Iterable[str], out_dir: str | Path, max_length: int = 16
) -> T5TokenizerFast:
    """Write and load a word-level T5 tokenizer (``tokenizer.json``) for a closed vocabulary.

    Ids: 0 = ``<pad>``, 1 = ``</s>``, 2 = ``<unk>``, then the sorted words. Text is
    lower-cased and split on whitespace and punctuation; ``</s>`` is appended, as T5 does.

    Args:
        words: the closed vocabulary (ASCII letters; case-insensitive).
        out_dir: folder for ``tokenizer.json`` (created).
        max_length: ``model_max_length`` (the pipeline's ``max_sequence_length``).

    Returns:
        a ``T5TokenizerFast`` with ``extra_ids=0`` (``len(tok)`` = 3 + number of words).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab_words = normalize_words(words)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = {T5_PAD: 0, T5_EOS: 1, T5_UNK: 2}
    for w in vocab_words:
        vocab[w] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=T5_UNK))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single=f"$A {T5_EOS}", pair=f"$A {T5_EOS} $B {T5_EOS}", special_tokens=[(T5_EOS, 1)]
    )
    path = out / "tokenizer.json"
    tk.save(str(path))
    tok = T5TokenizerFast(
        tokenizer_file=str(path),
        eos_token=T5_EOS,
        unk_token=T5_UNK,
        pad_token=T5_PAD,
        extra_ids=0,
        additional_special_tokens=[],
        model_max_length=max_length,
    )
    return tok
