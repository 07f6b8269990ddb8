"""Pictures and videos held inside the rows (a `datasets` Image / Video column, parquet's `{bytes, path}` structs,
decoded PIL images), as TRL's hub datasets ship them (e.g. `HuggingFaceH4/rlaif-v_formatted`).

Each is written once to a content-addressed folder (`<data cache>/media/embedded/<2 hex>/<sha256><suffix>`) and the
row names it by that key, so pair building, the collator and the data fingerprints read it like any image file; a
picture that many rows share is stored once, and a rerun finds its files already there.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image

from silkie.data.images import FolderImageStore, ImageLoadError, ImageStore
from silkie.data.row_error import RowError

EMBEDDED_PREFIX = "embedded/"
MEDIA_DIR = "media"  # inside the data cache folder
_SIGNATURES = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG", ".png"), (b"GIF8", ".gif"), (b"BM", ".bmp"),
               (b"\x1aE\xdf\xa3", ".mkv"))  # fmt: skip


def is_embedded(value: Any) -> bool:
    """Whether a media field holds the picture itself (a `datasets` Image: `{bytes, path}`, or a PIL image)."""
    return isinstance(value, Mapping) and "bytes" in value or isinstance(value, Image.Image)


def is_embedded_key(key: str) -> bool:
    """Whether `key` names media written by `EmbeddedMedia` (not a file under `data.images`)."""
    return key.startswith(EMBEDDED_PREFIX)


def _suffix(data: bytes, path: Any) -> str:
    """The file suffix: the original file's (`path`), else sniffed from the first bytes, else none."""
    if isinstance(path, str):
        suffix = PurePosixPath(path).suffix.lower()
        if 1 < len(suffix) <= 6 and suffix[1:].isalnum():
            return suffix
    for signature, suffix in _SIGNATURES:
        if data.startswith(signature):
            return suffix
    if data[:4] == b"RIFF":
        return {b"WEBP": ".webp", b"AVI ": ".avi"}.get(data[8:12], "")
    return ".mp4" if data[4:8] == b"ftyp" else ""


class EmbeddedMedia:
    """Writes the media a row holds into `folder` (once per content) and gives each its store key."""

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)
        self.keys_given = 0

    def key(self, value: Any, where: str) -> str:
        """The store key of one embedded picture/video (`where`: the field, for a row error); a `{bytes: None,
        path}` value is a reference to a file and keeps its path as the key."""
        if isinstance(value, Image.Image):
            buffer = io.BytesIO()
            value.save(buffer, format="PNG")  # lossless: the pixels the row holds
            data, path = buffer.getvalue(), None
        else:
            data, path = value.get("bytes"), value.get("path")
            if data is None:
                if isinstance(path, str) and path:
                    return path
                raise RowError("wrong_type", f"{where} holds neither bytes nor a path")
            if not isinstance(data, (bytes, bytearray)) or not data:
                raise RowError("wrong_type", f"{where} bytes are {type(data).__name__} of length {len(data or b'')}")
            data = bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        key = f"{EMBEDDED_PREFIX}{digest[:2]}/{digest}{_suffix(data, path)}"
        target = self.folder / key
        if not target.is_file():  # content-addressed: a file already there holds these bytes
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")  # ranks may write the same file at once
            staging.write_bytes(data)
            os.replace(staging, target)
        self.keys_given += 1
        return key


class WithEmbedded:
    """An image store that reads `embedded/` keys from the media folder and every other key from `store` (the
    recipe's `data.images`, None when it names none)."""

    def __init__(self, folder: str | os.PathLike[str], store: ImageStore | None):
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.embedded = FolderImageStore(folder)
        self.store = store

    def _store_for(self, key: str) -> ImageStore:
        if is_embedded_key(key):
            return self.embedded
        if self.store is None:
            raise ImageLoadError(key, "data.images is not set")
        return self.store

    def exists(self, key: str) -> bool:
        """Whether `key` names a readable file (embedded, or under `data.images`)."""
        return self._store_for(key).exists(key) if self.store is not None or is_embedded_key(key) else False

    def read_bytes(self, key: str) -> bytes:
        """The stored bytes behind `key`."""
        return self._store_for(key).read_bytes(key)

    def open(self, key: str) -> Image.Image:
        """The image behind `key`, RGB and fully loaded."""
        return self._store_for(key).open(key)

    def example(self) -> str | None:
        """A file of `data.images` (where a missing key would have to be), else an embedded one."""
        return self.store.example() if self.store is not None else self.embedded.example()

    def __repr__(self) -> str:
        return f"WithEmbedded({str(self.embedded.root)!r}, {self.store!r})"

    def __str__(self) -> str:
        return str(self.store) if self.store is not None else str(self.embedded)
