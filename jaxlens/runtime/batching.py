"""Rows of token ids -> fixed-shape batches: one bucket rule and one padding scheme for every method.

Padding is on the left (every row's last token sits in the last column, where the methods read),
lengths are rounded up to a few buckets so a run compiles once per bucket rather than once per
length, and a batch that has fewer rows than its shape is filled with one-token padding rows (no
row is empty; the methods mark them with index -1 and drop them).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

# 16 * sqrt(2)^k rounded UP to a multiple of 8: 16, 24, 32, 48, 64, 96, 128, 184, 256, ... (rounding down
# made 16 -> 32 one 2x step: a 17-token batch padded to 32, nearly doubling the lens's work)
_BUCKETS = tuple(sorted({math.ceil(16 * 2 ** (k / 2) / 8) * 8 for k in range(20)}))


def bucket(n: int) -> int:
    """The padded length for n tokens: steps of about sqrt(2), multiples of 8 (few programs, <= ~1.4x waste)."""
    for b in _BUCKETS:
        if b >= n:
            return b
    return int(math.ceil(n / 512) * 512)


def padded_length(longest: int, limit: int | None = None) -> int:
    """`bucket(longest)`, capped at `limit` (the model's positions, less any room kept for new tokens)."""
    T = bucket(longest)
    return max(longest, min(T, limit)) if limit is not None else T


def pad_left(seqs: Sequence[Sequence[int]], rows: int, length: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask) [rows, length] int32: each sequence right-aligned; rows past len(seqs) are
    one-token padding rows (mask 1 in the last column only)."""
    if len(seqs) > rows:
        raise ValueError(f"{len(seqs)} sequences do not fit in a batch of {rows} rows")
    tokens = np.full((rows, length), pad_id, np.int32)
    mask = np.zeros((rows, length), np.int32)
    mask[len(seqs) :, -1] = 1
    for r, seq in enumerate(seqs):
        if len(seq) > length:
            raise ValueError(f"a sequence of {len(seq)} tokens does not fit in length {length}")
        if len(seq):
            tokens[r, length - len(seq) :] = seq
            mask[r, length - len(seq) :] = 1
    return tokens, mask


def encode_texts(tokenizer, texts: Sequence[str], max_positions: int, add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids of each text; an empty encoding or one longer than the model is refused."""
    if tokenizer is None:
        raise ValueError("this model was loaded without a tokenizer; pass tokenizer= to jaxlens.load")
    ids = [list(tokenizer.encode(t, add_special_tokens=add_special_tokens)) for t in texts]
    for text, seq in zip(texts, ids):
        if not seq:
            raise ValueError(f"empty prompt: {text!r} encodes to no tokens")
        if len(seq) > max_positions:
            raise ValueError(f"prompt of {len(seq)} tokens is longer than max_positions={max_positions}; truncate it")
    return ids


@dataclasses.dataclass
class TextBatch:
    """Prompts left-padded into one fixed shape; index[r] is the prompt of row r (-1: padding row)."""

    tokens: np.ndarray  # [R, T] int32
    mask: np.ndarray  # [R, T] int32
    index: np.ndarray  # [R] int

    @property
    def n_real(self) -> int:
        return int((self.index >= 0).sum())


def text_batches(model, texts: Sequence[str], rows: int, room: int = 0) -> list[TextBatch]:
    """Prompts in order, `rows` at a time, each batch padded to a bucketed length (at most
    max_positions - room, where `room` tokens will follow: generation)."""
    if not texts:
        raise ValueError("no texts to run")
    if rows < 1:
        raise ValueError(f"batch rows must be >= 1, got {rows}")
    config = model.config
    ids = encode_texts(model.tokenizer, texts, config.max_positions)
    pad_id = config.pad_token_id or 0
    batches = []
    for start in range(0, len(ids), rows):
        group = ids[start : start + rows]
        T = padded_length(max(map(len, group)), config.max_positions - room)
        tokens, mask = pad_left(group, rows, T, pad_id)
        index = np.full(rows, -1)
        index[: len(group)] = np.arange(start, start + len(group))
        batches.append(TextBatch(tokens, mask, index))
    return batches


def pack_positions(mask: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The real tokens of a padded batch, packed: the R rows are `groups` equal groups of
    consecutive rows (one per data shard), and each group's real (row, position) pairs are listed
    row by row into M columns, M the largest group's count, bucketed (one program per bucket).

    Returns rows, cols [groups, M] int32 (row within the group; col -1 = padding entry) and
    start [R]: row r's tokens are columns start[r] .. start[r] + mask[r].sum() of group r // (R / groups).
    A lens read this way costs the real tokens, not R x T (`kernels.lens.lens_from_tokens`)."""
    R, T = mask.shape
    if groups < 1 or R % groups:
        raise ValueError(f"groups={groups} must divide the batch's {R} rows")
    per = R // groups
    real = mask.astype(bool).reshape(groups, per, T)
    M = bucket(int(real.sum((1, 2)).max()))
    rows = np.zeros((groups, M), np.int32)
    cols = np.full((groups, M), -1, np.int32)
    start = np.zeros(R, np.int64)
    for g in range(groups):
        r, c = np.nonzero(real[g])  # row-major: row by row, positions ascending
        rows[g, : len(r)], cols[g, : len(c)] = r, c
        counts = real[g].sum(1)
        start[g * per : (g + 1) * per] = np.cumsum(counts) - counts
    return rows, cols, start


# ---------------------------------------------------------------------------------------------
# Scored rows: a context and a continuation (multiple choice, sweeps)


@dataclasses.dataclass(frozen=True)
class Row:
    """One sequence to run: context ids + continuation ids (empty for letter rows)."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]
    item: int  # index into the items list
    option: int  # option index (letter rows: -1)

    @property
    def length(self) -> int:
        return len(self.context) + len(self.continuation)


@dataclasses.dataclass
class Batch:
    """Rows right-aligned (left padding) into one fixed shape; padding rows have item -1."""

    tokens: np.ndarray  # [R, T] int32
    mask: np.ndarray  # [R, T] int32, 1 = real token
    target: np.ndarray  # [R, T] bool, the continuation tokens scored
    item: np.ndarray  # [R] int, -1 for padding rows
    option: np.ndarray  # [R] int
    prompt_last: np.ndarray  # [R] int, position of the last context token (where a transplant lands)

    @property
    def n_real(self) -> int:
        return int((self.item >= 0).sum())

    @property
    def tail(self) -> int:
        """How many final positions' logits scoring reads: the longest continuation + 1, bucketed
        (letter batches: 1), capped at T."""
        longest = int(self.target.sum(-1).max())
        return 1 if longest == 0 else min(bucket(longest + 1), self.tokens.shape[1])


def make_batches(rows: Sequence[Row], batch_rows: int, pad_id: int = 0, max_length: int | None = None) -> list[Batch]:
    """Rows sorted by length, grouped `batch_rows` at a time, each group padded to `bucket(longest)`
    (at most `max_length`, the model's positions).

    Every batch has exactly `batch_rows` rows (the last is filled with one-token padding rows), so
    a run compiles once per length bucket, not once per item.
    """
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    order = sorted(range(len(rows)), key=lambda r: rows[r].length)
    if max_length is not None and rows and rows[order[-1]].length > max_length:
        r = rows[order[-1]]
        raise ValueError(f"item {r.item} (option {r.option}) is {r.length} tokens, longer than the model's "
                         f"{max_length} positions; shorten it or its template")
    batches = []
    for start in range(0, len(order), batch_rows):
        group = [rows[r] for r in order[start : start + batch_rows]]
        T = padded_length(max(r.length for r in group), max_length)
        tokens, mask = pad_left([r.context + r.continuation for r in group], batch_rows, T, pad_id)
        target = np.zeros((batch_rows, T), bool)
        item = np.full(batch_rows, -1)
        option = np.full(batch_rows, -1)
        prompt_last = np.full(batch_rows, T - 1)
        for j, r in enumerate(group):
            if r.continuation:
                target[j, T - len(r.continuation) :] = True
            item[j], option[j] = r.item, r.option
            prompt_last[j] = T - len(r.continuation) - 1
        batches.append(Batch(tokens, mask, target, item, option, prompt_last))
    return batches
