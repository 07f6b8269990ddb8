"""tiktoken rank files (`qwen.tiktoken`) and an offline byte-level BPE trainer.

The trainer exists so tests and tiny demo models can build a real vocabulary without the model hub;
`pad_ranks` grows such a vocabulary to the official 151,643 ranks so the special token ids match.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import itertools
import os
import unicodedata
from collections import Counter
from collections.abc import Iterable

import regex

PAT_STR = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501

_PAT = regex.compile(PAT_STR)


def load_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a `base64(token) rank` file; raises ValueError naming the file (and line) when malformed."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        contents = f.read()
    ranks: dict[bytes, int] = {}
    seen_ranks: set[int] = set()
    for lineno, line in enumerate(contents.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}: line {lineno}: expected 'base64_token rank', got {line[:80]!r}")
        try:
            token = base64.b64decode(parts[0], validate=True)
            rank = int(parts[1])
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"{path}: line {lineno}: cannot parse {line[:80]!r} ({e})") from None
        if not token or rank < 0:
            raise ValueError(f"{path}: line {lineno}: empty token or negative rank in {line[:80]!r}")
        if token in ranks or rank in seen_ranks:
            raise ValueError(f"{path}: line {lineno}: duplicate token or rank in {line[:80]!r}")
        ranks[token] = rank
        seen_ranks.add(rank)
    if not ranks:
        raise ValueError(f"{path}: no ranks found (empty tiktoken file)")
    if len(seen_ranks) != max(seen_ranks) + 1:
        missing = min(set(range(len(seen_ranks))) - seen_ranks)
        raise ValueError(f"{path}: ranks must be 0..{len(ranks) - 1} without gaps; rank {missing} is missing")
    return ranks


def write_tiktoken_ranks(ranks: dict[bytes, int], path: str | os.PathLike) -> None:
    """Write ranks as `base64(token) rank` lines, sorted by rank (the format `load_tiktoken_ranks` reads)."""
    lines = [f"{base64.b64encode(tok).decode('ascii')} {rank}\n" for tok, rank in sorted(ranks.items(), key=_by_rank)]
    with open(os.fspath(path), "w", encoding="utf-8", newline="\n") as f:
        f.writelines(lines)


def _by_rank(item: tuple[bytes, int]) -> int:
    return item[1]


def _merge_word(word: list[int], a: int, b: int, new: int, deltas: dict[tuple[int, int], int]) -> list[int]:
    """Merge every (a, b) in `word` left to right; record the pair-count changes (per word occurrence) in deltas."""
    out: list[int] = []
    i, n = 0, len(word)
    while True:
        try:
            j = word.index(a, i)
        except ValueError:
            break
        if j + 1 == n or word[j + 1] != b:
            out += word[i : j + 1]
            i = j + 1
            continue
        out += word[i:j]
        if out:
            prev = out[-1]
            deltas[(prev, a)] = deltas.get((prev, a), 0) - 1
            deltas[(prev, new)] = deltas.get((prev, new), 0) + 1
        if j + 2 < n:
            nxt = word[j + 2]
            deltas[(b, nxt)] = deltas.get((b, nxt), 0) - 1
            deltas[(new, nxt)] = deltas.get((new, nxt), 0) + 1
        out.append(new)
        i = j + 2
    out += word[i:]
    return out


def train_bpe_ranks(texts: Iterable[str], vocab_size: int) -> dict[bytes, int]:
    """Train byte-level BPE ranks (0..255 = single bytes, then merges in order) with PAT_STR pre-tokenization.

    Deterministic: the most frequent adjacent pair wins, ties go to the smallest (left id, right id).
    Pair counts are updated incrementally, only for the words that contain the merged pair.
    Stops early when no pair is left.
    """
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be >= 256 (the single bytes), got {vocab_size}")
    chunk_counts: Counter = Counter()
    for text in texts:
        chunk_counts.update(_PAT.findall(unicodedata.normalize("NFC", text)))
    byte_counts: Counter = Counter()
    for chunk, c in chunk_counts.items():
        byte_counts[chunk.encode("utf-8")] += c
    words = [list(w) for w in byte_counts]  # ids of single bytes are the byte values
    counts = list(byte_counts.values())

    vocab: list[bytes] = [bytes([i]) for i in range(256)]
    ranks: dict[bytes, int] = {tok: i for i, tok in enumerate(vocab)}
    pair_counts: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], set[int]] = {}
    for wi, word in enumerate(words):
        for pair in itertools.pairwise(word):
            pair_counts[pair] = pair_counts.get(pair, 0) + counts[wi]
            where.setdefault(pair, set()).add(wi)
    heap = [(-c, p) for p, c in pair_counts.items()]
    heapq.heapify(heap)

    while len(ranks) < vocab_size and heap:
        neg, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg or neg == 0:
            continue  # stale heap entry
        a, b = pair
        merged = vocab[a] + vocab[b]
        new = ranks.get(merged)
        if new is None:
            new = len(vocab)
            vocab.append(merged)
            ranks[merged] = new
        changed: set[tuple[int, int]] = set()
        for wi in where.pop(pair, ()):  # may hold stale words that no longer contain the pair
            deltas: dict[tuple[int, int], int] = {}
            words[wi] = _merge_word(words[wi], a, b, new, deltas)
            c = counts[wi]
            for p, d in deltas.items():
                if d:
                    pair_counts[p] = pair_counts.get(p, 0) + d * c
                    changed.add(p)
                    if d > 0:
                        where.setdefault(p, set()).add(wi)
        pair_counts.pop(pair, None)
        for p in changed:
            if p != pair and pair_counts.get(p, 0) > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
    return ranks


def pad_ranks(ranks: dict[bytes, int], size: int) -> dict[bytes, int]:
    """Return a copy of `ranks` grown to `size` ranks with filler tokens that BPE can never produce.

    Fillers start with byte 0xFF, which never occurs in UTF-8 text, so encoding real text is unchanged.
    """
    if size < len(ranks):
        raise ValueError(f"cannot pad {len(ranks)} ranks down to {size}")
    out = dict(ranks)
    next_rank = len(ranks)
    i = 0
    while next_rank < size:
        filler = b"\xff\xff" + i.to_bytes(4, "big")
        i += 1
        if filler not in out:
            out[filler] = next_rank
            next_rank += 1
    return out
