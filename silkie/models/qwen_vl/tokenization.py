"""Native Qwen-VL-Chat tokenizer (tiktoken BPE + 217 special tokens + 258-token image spans).

A plain class with HF-like method names (`encode`, `decode`, `batch_decode`, `__call__`, `save_pretrained`,
`from_pretrained`), so `transformers.TextIteratorStreamer(tokenizer)` works. Matches the original remote code:
ids of specials are len(ranks) + k, text is NFC-normalized, `<img>PATH</img>` becomes `<img>`, one id per UTF-8
byte of PATH (id == byte value), `<imgpad>` up to 256 slots, `</img>`.
"""

from __future__ import annotations

import json
import os
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tiktoken

from silkie.errors import MissingInputError
from silkie.models.qwen_vl.bpe import PAT_STR, load_tiktoken_ranks, pad_ranks, train_bpe_ranks, write_tiktoken_ranks

__all__ = [
    "DEFAULT_SYSTEM",
    "IMAGE_SLOTS",
    "IMAGE_TAG_TOKENS",
    "MAX_IMAGE_PATH_BYTES",
    "MAX_WINDOW_SIZE",
    "PAT_STR",
    "SPECIAL_TOKENS",
    "VOCAB_FILE",
    "QWenTokenizer",
    "load_tiktoken_ranks",
    "pad_ranks",
    "train_bpe_ranks",
    "write_tiktoken_ranks",
]

VOCAB_FILE = "qwen.tiktoken"
ENDOFTEXT, IMSTART, IMEND = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
IMG_START, IMG_END, IMG_PAD = "<img>", "</img>", "<imgpad>"
IMAGE_TAG_TOKENS: tuple[str, ...] = (
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    "<quad>",
    "</quad>",
    IMG_START,
    IMG_END,
    IMG_PAD,
)
SPECIAL_TOKENS: tuple[str, ...] = (
    (ENDOFTEXT, IMSTART, IMEND) + tuple(f"<|extra_{i}|>" for i in range(205)) + IMAGE_TAG_TOKENS
)
IMAGE_SLOTS = 256
MAX_IMAGE_PATH_BYTES = 254
DEFAULT_SYSTEM = "You are a helpful assistant."
MODEL_MAX_LENGTH = 8192
MAX_WINDOW_SIZE = 6144  # generation_config.json of Qwen-VL-Chat: history turns are dropped beyond it


class TokenizerOutput(dict):
    """dict of `input_ids` / `attention_mask`, also as attributes (`.input_ids`, as transformers' BatchEncoding),
    with a `.to(device)` helper for tensor values."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: Any) -> TokenizerOutput:
        """Move tensor values to `device` (in place); returns self."""
        for key, value in self.items():
            if hasattr(value, "to"):
                self[key] = value.to(device)
        return self


class QWenTokenizer:
    """Qwen-VL-Chat tokenizer on top of `tiktoken.Encoding`."""

    padding_side = "right"
    model_max_length = MODEL_MAX_LENGTH
    pad_token = eos_token = ENDOFTEXT
    bos_token = None
    bos_token_id = None

    def __init__(self, vocab_file: str | os.PathLike, errors: str = "replace") -> None:
        """Load `vocab_file` (a qwen.tiktoken rank file) and build the tiktoken encoding."""
        self.vocab_file = os.fspath(vocab_file)
        self.errors = errors
        self.mergeable_ranks = load_tiktoken_ranks(self.vocab_file)
        self.special_tokens: dict[str, int] = {
            tok: len(self.mergeable_ranks) + k for k, tok in enumerate(SPECIAL_TOKENS)
        }
        self._build()

    def _build(self) -> None:
        self.tokenizer = tiktoken.Encoding(
            "Qwen", pat_str=PAT_STR, mergeable_ranks=self.mergeable_ranks, special_tokens=self.special_tokens
        )
        self.decoder: dict[int, bytes] = {rank: tok for tok, rank in self.mergeable_ranks.items()}
        self.special_decoder: dict[int, str] = {i: tok for tok, i in self.special_tokens.items()}
        self.eod_id = self.special_tokens[ENDOFTEXT]
        self.im_start_id = self.special_tokens[IMSTART]
        self.im_end_id = self.special_tokens[IMEND]
        self.img_start_id = self.special_tokens[IMG_START]
        self.img_end_id = self.special_tokens[IMG_END]
        self.img_pad_id = self.special_tokens[IMG_PAD]
        self.pad_token_id = self.eos_token_id = self.eod_id
        self._tag_set = frozenset(IMAGE_TAG_TOKENS)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["tokenizer"]  # rebuilt on unpickle
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._build()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> QWenTokenizer:
        """Load from a folder holding qwen.tiktoken (or the file itself); FileNotFoundError names the file."""
        p = Path(path)
        vocab = p if p.is_file() or p.name == VOCAB_FILE else p / VOCAB_FILE
        if not vocab.is_file():
            raise MissingInputError(f"tokenizer vocabulary not found: expected {vocab}")
        errors = kwargs.get("errors")
        config = vocab.parent / "tokenizer_config.json"
        if errors is None and config.is_file():
            errors = json.loads(config.read_text(encoding="utf-8")).get("errors")
        return cls(vocab, errors=errors or "replace")

    def save_pretrained(self, directory: str | os.PathLike) -> list[str]:
        """Write qwen.tiktoken and tokenizer_config.json into `directory`; returns the written paths."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        vocab, config = d / VOCAB_FILE, d / "tokenizer_config.json"
        write_tiktoken_ranks(self.mergeable_ranks, vocab)
        cfg = {
            "tokenizer_class": "QWenTokenizer",
            "model_max_length": MODEL_MAX_LENGTH,
            "errors": self.errors,
            "padding_side": self.padding_side,
            "pad_token": ENDOFTEXT,
            "eos_token": ENDOFTEXT,
            "vocab_size": self.vocab_size,
        }
        config.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        return [str(vocab), str(config)]

    @property
    def vocab_size(self) -> int:
        """Number of ids: len(ranks) + 217 specials (151860 for the real vocabulary)."""
        return len(self.mergeable_ranks) + len(self.special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str, allowed_special: str | Iterable[str] = "all", **kwargs: Any) -> list[int]:
        """NFC-normalize and encode; `allowed_special` is "all" or a set of special strings (others stay text).

        Every `<img>PATH</img>` (when `<img>` is allowed) becomes 258 ids (see module docstring).
        """
        text = unicodedata.normalize("NFC", text)
        if allowed_special == "all":
            allowed: set[str] | str = "all"
            images = True
        else:
            allowed = set(allowed_special) & self.special_tokens.keys()
            images = IMG_START in allowed
        ids: list[int] = []
        pos = 0
        while images:
            start = text.find(IMG_START, pos)
            if start < 0:
                break
            end = text.find(IMG_END, start + len(IMG_START))
            if end < 0:
                raise ValueError(f"unclosed {IMG_START} in text (no {IMG_END} after position {start})")
            ids += self._encode_plain(text[pos:start], allowed)
            ids += self._image_span(text[start + len(IMG_START) : end])
            pos = end + len(IMG_END)
        ids += self._encode_plain(text[pos:], allowed)
        return ids

    def _encode_plain(self, text: str, allowed: set[str] | str) -> list[int]:
        return self.tokenizer.encode(text, allowed_special=allowed, disallowed_special=()) if text else []

    def _image_span(self, path: str) -> list[int]:
        data = path.encode("utf-8")
        if len(data) > MAX_IMAGE_PATH_BYTES:
            raise ValueError(
                f"image path {path!r} is {len(data)} UTF-8 bytes; the limit is {MAX_IMAGE_PATH_BYTES} bytes "
                f"(the {IMAGE_SLOTS} slots between {IMG_START} and {IMG_END} must keep at least one {IMG_PAD})"
            )
        return [self.img_start_id, *data] + [self.img_pad_id] * (IMAGE_SLOTS - len(data)) + [self.img_end_id]

    def _encode_tags_only(self, text: str) -> list[int]:
        return self.encode(text, allowed_special=self._tag_set)

    def convert_tokens_to_ids(self, token: str | Sequence[str]) -> int | list[int]:
        """Id of a special token string (a list gives a list); KeyError naming the token otherwise."""
        if not isinstance(token, str):
            return [self.convert_tokens_to_ids(t) for t in token]
        if token not in self.special_tokens:
            raise KeyError(f"{token!r} is not a special token of QWenTokenizer")
        return self.special_tokens[token]

    def __call__(
        self,
        text: str | list[str],
        return_tensors: str | None = None,
        padding: bool | str = False,
        add_special_tokens: bool = True,
    ) -> TokenizerOutput:
        """Tokenize a string or a batch: {"input_ids", "attention_mask"}; right padding with pad_token_id.

        `add_special_tokens` is accepted for HF compatibility and has no effect (no BOS/EOS is ever added).
        """
        single = isinstance(text, str)
        seqs = [self.encode(t) for t in ([text] if single else text)]
        if padding not in (False, True, "longest", "do_not_pad"):
            raise ValueError(f"unsupported padding={padding!r}; use True/'longest' or False")
        width = max((len(s) for s in seqs), default=0)
        pad = padding in (True, "longest")
        masks = [[1] * len(s) + ([0] * (width - len(s)) if pad else []) for s in seqs]
        if pad:
            seqs = [s + [self.pad_token_id] * (width - len(s)) for s in seqs]
        if return_tensors is None:
            return TokenizerOutput(input_ids=seqs[0] if single else seqs, attention_mask=masks[0] if single else masks)
        if return_tensors != "pt":
            raise ValueError(f"unsupported return_tensors={return_tensors!r}; only 'pt' or None")
        if len({len(s) for s in seqs}) > 1:
            raise ValueError("sequences have different lengths; pass padding=True to return tensors")
        import torch

        return TokenizerOutput(
            input_ids=torch.tensor(seqs, dtype=torch.long), attention_mask=torch.tensor(masks, dtype=torch.long)
        )

    # ------------------------------------------------------------------ decoding
    def decode(self, ids: Any, skip_special_tokens: bool = False, errors: str | None = None, **kwargs: Any) -> str:
        """Ids (int, list or 1-D tensor) -> text, as the original: an image span becomes `<img>PATH</img>`, and
        with skip_special_tokens=True its PATH stays while the special tokens go.

        Where the original raises, this decodes what it can (it also decodes partial model output while
        streaming): a `<img>` without a later `</img>`, or a span that is not path bytes then `<imgpad>`s, is
        decoded as the tag and ordinary tokens; ids outside the vocabulary (the model's 76 unused rows, -100)
        are left out; a path that is not valid UTF-8 is decoded with the tokenizer's `errors` ("replace").
        """
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        errors = errors or self.errors
        out: list[str] = []
        buf = bytearray()

        def flush() -> None:
            if buf:
                out.append(buf.decode("utf-8", errors=errors))
                buf.clear()

        i, n = 0, len(ids)
        while i < n:
            t = ids[i]
            i += 1
            if t in self.decoder:
                buf += self.decoder[t]
                continue
            if t not in self.special_decoder:
                continue
            span = self._path_span(ids, i) if t == self.img_start_id else None
            if span is not None:
                path, i = span
                if skip_special_tokens:  # the original re-encodes the path as text, then drops the specials
                    buf += path
                else:
                    flush()
                    out.append(f"{IMG_START}{path.decode('utf-8', errors=errors)}{IMG_END}")
                continue
            if not skip_special_tokens:
                flush()
                out.append(self.special_decoder[t])
        flush()
        return "".join(out)

    def _path_span(self, ids: list[int], start: int) -> tuple[bytes, int] | None:
        """(PATH bytes, index after `</img>`) for a well-formed span whose slots begin at `start`, else None."""
        try:
            end = ids.index(self.img_end_id, start)
            pad = ids.index(self.img_pad_id, start, end)
        except ValueError:
            return None
        path = ids[start:pad]
        if not all(isinstance(b, int) and 0 <= b < 256 for b in path):
            return None
        return bytes(path), end + 1

    def image_paths(self, ids: Sequence[int]) -> list[str]:
        """The PATH of every well-formed image span in `ids`, in order (the images a prompt needs)."""
        ids = list(ids)
        paths = []
        for index, t in enumerate(ids):
            span = self._path_span(ids, index + 1) if t == self.img_start_id else None
            if span is not None:
                paths.append(span[0].decode("utf-8", errors=self.errors))
        return paths

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False, **kwargs: Any) -> list[str]:
        """Decode each sequence of a batch (list of lists or 2-D tensor)."""
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens=skip_special_tokens, **kwargs) for s in sequences]

    # ------------------------------------------------------------------ chat format
    def build_chat_context(
        self,
        query: str,
        history: Sequence[tuple[str, str | None]] = (),
        system: str = DEFAULT_SYSTEM,
        max_window_size: int = MAX_WINDOW_SIZE,
    ) -> list[int]:
        """ChatML prompt ids exactly as the original make_context (roles/contents allow only the 9 tag tokens).

        `history` holds earlier (query, response) turns, oldest first; a response of None gives the user turn
        alone. Turns are kept from the newest back while the system turn and the kept turns stay under
        `max_window_size` tokens (the current query does not count), as the original."""
        enc = self._encode_tags_only
        nl = enc("\n")

        def turn(role: str, content: str) -> list[int]:
            return [self.im_start_id, *enc(role), *nl, *enc(content), self.im_end_id]

        system_ids = turn("system", system)
        context: list[int] = []
        for q, r in reversed(history):
            earlier = nl + turn("user", q) + nl + (turn("assistant", r) if r is not None else [])
            if len(system_ids) + len(earlier) + len(context) >= max_window_size:
                break
            context = earlier + context
        return system_ids + context + nl + turn("user", query) + nl + [self.im_start_id, *enc("assistant"), *nl]

    def encode_answer(self, answer: str, add_eod: bool = True) -> list[int]:
        """Training answer ids: enc(answer) + im_end + enc("\\n") (+ eod when add_eod)."""
        ids = self._encode_tags_only(answer) + [self.im_end_id] + self._encode_tags_only("\n")
        return ids + [self.eod_id] if add_eod else ids

    @staticmethod
    def from_list_format(items: Sequence[dict]) -> str:
        """[{"image": p}, ..., {"text": t}] -> "Picture 1: <img>p</img>\\n...t" (original from_list_format)."""
        text, num_images = "", 0
        for ele in items:
            if "image" in ele:
                num_images += 1
                text += f"Picture {num_images}: {IMG_START}{ele['image']}{IMG_END}\n"
            elif "text" in ele:
                text += ele["text"]
            elif "box" in ele:
                if "ref" in ele:
                    text += f"<ref>{ele['ref']}</ref>"
                for box in ele["box"]:
                    x1, y1, x2, y2 = (int(v) for v in box[:4])
                    text += f"<box>({x1},{y1}),({x2},{y2})</box>"
            else:
                raise ValueError(f"unsupported list-format element: {ele!r}")
        return text
