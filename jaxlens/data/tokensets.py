"""Token sets: which vocabulary ids count as "the model starting to say this word".

METHODS.md §A (Wendler et al.), the token set of a word is every id whose string is a prefix of
the word, read with and without the leading-space marker and in its capitalised form; for words
in a non-Latin script (zh, ru, ...) also the byte token of the word's first UTF-8 byte (models
with byte fallback start an unseen character with it). Whitespace-only tokens are dropped.

The vocabulary is read once per tokenizer (`vocab_strings`, cached: Gemma has 262k ids) into an
inverse map string -> ids, so a word's set is `len(word)` dictionary look-ups, not a vocab scan.

    vocab = vocab_strings(model.tokenizer)
    items, dropped = filter_items(words, vocab)    # words: [{"en": ..., "zh": ...}, ...]
    masks = to_masks([it.sets["zh"] for it in items], vocab.size)   # [S, V] bool
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
import weakref
from typing import Iterable, Mapping, Sequence

import numpy as np

_SP_SPACE = "\u2581"  # SentencePiece's leading-space marker (Gemma, Llama 2, Mistral)
_SP_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # SentencePiece byte-fallback pieces


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE writes each byte as one printable character; this maps them back."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


@dataclasses.dataclass(frozen=True)
class VocabStrings:
    """What each id reads as: `strings[i]` with a leading space as " " ("" for special and
    partial-byte tokens), `byte_ids[b]` the id of the single-byte token for byte b (-1: none)."""

    strings: tuple[str, ...]
    byte_ids: np.ndarray  # [256] int
    by_string: Mapping[str, tuple[int, ...]]

    @property
    def size(self) -> int:
        return len(self.strings)


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def vocab_strings(tokenizer) -> VocabStrings:
    """Read every id's surface string once per tokenizer (SentencePiece or byte-level BPE)."""
    try:
        return _CACHE[tokenizer]
    except (KeyError, TypeError):
        pass
    size = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    byte_ids = np.full(256, -1, dtype=np.int64)
    byte_level = not any(p and _SP_SPACE in p for p in pieces) and any(p and p.startswith("\u0120") for p in pieces)
    decoder = _byte_level_decoder() if byte_level else None
    strings = []
    for i, piece in enumerate(pieces):
        text = ""
        if piece is None or i in special:
            pass
        elif decoder is not None:  # byte-level BPE: piece chars are bytes
            raw = bytes(decoder[c] for c in piece) if all(c in decoder for c in piece) else piece.encode()
            if len(raw) == 1 and byte_ids[raw[0]] < 0:
                byte_ids[raw[0]] = i
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = ""  # a partial character: only reachable as a byte token
        elif (m := _SP_BYTE.match(piece)) is not None:
            byte_ids[int(m.group(1), 16)] = i
            text = "" if int(m.group(1), 16) >= 0x80 else chr(int(m.group(1), 16))
        else:
            text = piece.replace(_SP_SPACE, " ")
        strings.append(text)
    by_string: dict[str, list[int]] = {}
    for i, s in enumerate(strings):
        if s and not s.isspace():  # whitespace-only tokens never count as starting a word
            by_string.setdefault(s, []).append(i)
    vocab = VocabStrings(tuple(strings), byte_ids, {s: tuple(ids) for s, ids in by_string.items()})
    try:
        _CACHE[tokenizer] = vocab
    except TypeError:
        pass
    return vocab


def needs_byte_token(word: str) -> bool:
    """Words whose first letter is outside the Latin script (zh, ru, ja, ar, ...)."""
    first = word.strip()[:1]
    return bool(first) and not first.isascii() and not unicodedata.name(first, "").startswith("LATIN")


def word_variants(word: str) -> tuple[str, ...]:
    """The word, capitalised, each with and without a leading space."""
    word = word.strip()
    forms = dict.fromkeys([word, word[:1].upper() + word[1:]])
    return tuple(v for form in forms for v in (form, " " + form))


def token_set(word: str, vocab: VocabStrings, byte_token: bool | None = None) -> frozenset[int]:
    """Every id whose string is a prefix of one of the word's variants (+ its first byte token)."""
    if not word.strip():
        raise ValueError("empty word: every word in a list needs some text")
    ids: set[int] = set()
    for form in word_variants(word):
        for end in range(1, len(form) + 1):
            ids.update(vocab.by_string.get(form[:end], ()))
    if needs_byte_token(word) if byte_token is None else byte_token:
        first_byte = word.strip().encode("utf-8")[0]
        if vocab.byte_ids[first_byte] >= 0:
            ids.add(int(vocab.byte_ids[first_byte]))
    return frozenset(ids)


@dataclasses.dataclass(frozen=True)
class Concept:
    """One concept: its word per language and the token set of each word."""

    words: Mapping[str, str]  # lang -> word
    sets: Mapping[str, frozenset[int]]  # lang -> token ids
    ambiguous: frozenset[int] = frozenset()  # ids in both compared languages' sets


def filter_items(
    words: Sequence[Mapping[str, str]],
    vocab: VocabStrings,
    compare: tuple[str, str] = ("en", "zh"),
    ambiguous: str = "drop",
    source: str | None = None,
    source_overlap: str = "remove",
) -> tuple[list[Concept], list[dict]]:
    """Token sets for each concept's words, and METHODS.md §A's item filter.

    words: one dict lang -> word per concept (it must hold both `compare` languages).
    compare: the two languages whose probabilities are contrasted (English first).
    ambiguous: what to do with ids in both compared sets: "drop" the item (METHODS.md), "remove"
      the shared ids from both sets (dropping the item only if a set becomes empty), or "keep".
    source: the prompt's input language. A token of both the English and the source word (fr
      "Albanie" / en "Albania": "Alb") would count copying the input as English, so (our addition
      to METHODS.md's filter): concepts whose source word IS the English word are dropped, and
      `source_overlap` ("remove", "drop" or "keep") handles ids in both the English and source
      sets like `ambiguous` does. Pass source=None for METHODS.md's filter alone.
    Items are also dropped when any set is empty or the English word is a substring of the other
    (case-insensitive). Returns (kept items, dropped [{words, reason}]).
    """
    for name, value in (("ambiguous", ambiguous), ("source_overlap", source_overlap)):
        if value not in ("drop", "remove", "keep"):
            raise ValueError(f"{name} must be 'drop', 'remove' or 'keep', not {value!r}")
    if source in compare:
        source = None  # nothing to separate
    en, other = compare
    kept, dropped = [], []
    for row in words:
        missing = [lang for lang in compare if not str(row.get(lang, "")).strip()]
        if missing:
            raise ValueError(f"word list row {dict(row)} has no word for {missing}")
        sets = {lang: token_set(word, vocab) for lang, word in row.items()}
        shared = sets[en] & sets[other]
        copied = sets[en] & sets[source] if source is not None else frozenset()
        reason = None
        if row[en].strip().casefold() in row[other].strip().casefold():
            reason = f"the English word is a substring of the {other} word"
        elif source is not None and row[source].strip().casefold() == row[en].strip().casefold():
            reason = f"the {source} word is the English word"
        elif shared and ambiguous == "drop":
            reason = f"{len(shared)} token(s) in both sets: {sorted(shared)[:5]}"
        elif copied and source_overlap == "drop":
            reason = f"{len(copied)} token(s) in both the English and {source} sets: {sorted(copied)[:5]}"
        else:
            if shared and ambiguous == "remove":
                sets[en], sets[other] = sets[en] - shared, sets[other] - shared
            if copied and source_overlap == "remove":
                sets[en], sets[source] = sets[en] - copied, sets[source] - copied
            empty = [lang for lang in compare if not sets[lang]]  # the source's own set is only reported
            if empty:
                after = " after removing shared ids" if (shared and ambiguous == "remove") or (copied and source_overlap == "remove") else ""
                reason = f"empty token set for {empty}{after}"
        if reason:
            dropped.append({"words": dict(row), "reason": reason})
        else:
            kept.append(Concept(dict(row), sets, frozenset(shared)))
    return kept, dropped


def to_masks(sets: Iterable[Iterable[int]], vocab_size: int) -> np.ndarray:
    """Token sets -> [S, V] bool masks (the lens kernel's `token_sets`)."""
    sets = [sorted(s) for s in sets]
    masks = np.zeros((len(sets), vocab_size), dtype=bool)
    for row, ids in enumerate(sets):
        if ids and (min(ids) < 0 or max(ids) >= vocab_size):
            raise ValueError(f"token set {row} has ids outside [0, {vocab_size})")
        masks[row, ids] = True
    return masks


def padded_ids(sets: Sequence[Iterable[int]], pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-row token sets -> (ids [S, n] int32 padded with `pad`, weights [S, n] float32 1/0).

    For per-item sets (each prompt its own words) this is far cheaper than [S, V] masks: the lens
    reads the probability of each id (`targets`) and a set's probability is `Σ weights·probs`.
    """
    sets = [sorted(s) for s in sets]
    n = max([len(s) for s in sets] + [1])
    ids = np.full((len(sets), n), pad, dtype=np.int32)
    weights = np.zeros((len(sets), n), dtype=np.float32)
    for row, s in enumerate(sets):
        ids[row, : len(s)] = s
        weights[row, : len(s)] = 1.0
    return ids, weights
