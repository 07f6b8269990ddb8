"""Data: VLFeedback / preference-file loading, pair building, splitting, tokenization.

`formatting` and `collator` (which import torch / the tokenizer) are loaded on first access.
"""

from importlib import import_module
from typing import Any

from silkie.data.images import (
    FolderImageStore,
    ImageLoadError,
    ImageStore,
    ZipImageStore,
    image_key,
    open_image_store,
)
from silkie.data.pairs import (
    PairReport,
    PreferencePair,
    build_vlfeedback_pairs,
    pairs_from_preference_rows,
    resolve_aspect_weights,
)
from silkie.data.sources import (
    ASPECTS,
    Completion,
    FeedbackRow,
    LoadedRows,
    PreferenceRow,
    load_preference_file,
    load_vlfeedback_hf,
    load_vlfeedback_jsonl,
)
from silkie.data.split import split_by_prompt

_LAZY = {"tokenize_pairs": "silkie.data.formatting", "PairCollator": "silkie.data.collator"}

__all__ = [
    "ASPECTS",
    "Completion",
    "FeedbackRow",
    "FolderImageStore",
    "ImageLoadError",
    "ImageStore",
    "LoadedRows",
    "PairCollator",
    "PairReport",
    "PreferencePair",
    "PreferenceRow",
    "ZipImageStore",
    "build_vlfeedback_pairs",
    "image_key",
    "load_preference_file",
    "load_vlfeedback_hf",
    "load_vlfeedback_jsonl",
    "open_image_store",
    "pairs_from_preference_rows",
    "resolve_aspect_weights",
    "split_by_prompt",
    "tokenize_pairs",
]


def __getattr__(name: str) -> Any:
    """Import `tokenize_pairs` / `PairCollator` lazily (they pull in torch and the tokenizer)."""
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'silkie.data' has no attribute {name!r}")
