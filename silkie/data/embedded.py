"""Pictures and videos held inside the rows (a `datasets` Image / Video column, parquet's `{bytes, path}` structs,
decoded PIL images), as TRL's hub datasets ship them (e.g. `HuggingFaceH4/rlaif-v_formatted`).

Each is written once to a content-addressed folder (`<data cache>/media/embedded/<2 hex>/<sha256><suffix>`, the
suffix sniffed from the bytes) and the row names it by that key, so pair building, the collator and the data
fingerprints read it like any image file; a picture that many rows share is stored once, and a rerun finds its
files already there. A row's pictures are written only once the loader keeps the row (`commit`), so
`data.max_prompts` writes only the pictures of the prompts it keeps.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any

from PIL import Image

from silkie.data.images import FolderImageStore, ImageLoadError, ImageStore
from silkie.data.row_error import RowError

EMBEDDED_PREFIX = "embedded/"
EMBEDDED_KEY = re.compile(r"^embedded/[0-9a-f]{2}/[0-9a-f]{64}(\.[a-z0-9]+)?$")
MEDIA_DIR = "media"  # inside the data cache folder
_SIGNATURES = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG", ".png"), (b"GIF8", ".gif"), (b"BM", ".bmp"),
               (b"\x1aE\xdf\xa3", ".mkv"))  # fmt: skip


def is_embedded(value: Any) -> bool:
    """Whether a media field holds the picture itself (a `datasets` Image: `{bytes, path}`, or a PIL image)."""
    return isinstance(value, Mapping) and "bytes" in value or isinstance(value, Image.Image)


def is_embedded_key(key: str) -> bool:
    """Whether `key` names media written by `EmbeddedMedia` (not a file under `data.images`)."""
    return EMBEDDED_KEY.match(key) is not None


def _suffix(data: bytes) -> str:
    """The file suffix sniffed from the first bytes (none when unknown): the key depends on the content only."""
    for signature, suffix in _SIGNATURES:
        if data.startswith(signature):
            return suffix
    if data[:4] == b"RIFF":
        return {b"WEBP": ".webp", b"AVI ": ".avi"}.get(data[8:12], "")
    return ".mp4" if data[4:8] == b"ftyp" else ""


def _png(image: Image.Image, where: str) -> bytes:
    """A PIL image the row holds, losslessly as PNG (modes PNG cannot store, e.g. CMYK, as RGB)."""
    if image.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    try:
        image.save(buffer, format="PNG")
    except (OSError, ValueError) as exc:
        raise RowError("wrong_type", f"{where} is a picture PNG cannot store ({exc})") from exc
    return buffer.getvalue()


def _stored(path: Path, size: int) -> bool:
    """Whether `path` holds a complete copy (a crash or a partial copy can leave a short file at the final name)."""
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def _write(target: Path, data: bytes) -> None:
    """Write `data` at `target` through a uniquely named staging file (ranks of several nodes may write the same
    picture at once), then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(staging, target)
    except OSError:
        if not _stored(target, len(data)):  # another writer's complete copy is as good as ours
            raise
    finally:
        Path(staging).unlink(missing_ok=True)


class EmbeddedMedia:
    """Names the media a row holds by their content keys and, once the row is kept (`commit`), writes them into
    `folder`; a picture already in `folder` or in one of `elsewhere` (e.g. a `data.images` folder `silkie prepare`
    wrote it into) is not written again."""

    def __init__(self, folder: str | os.PathLike[str], elsewhere: Sequence[str | os.PathLike[str]] = ()):
        self.folder = Path(folder)
        self.elsewhere = [Path(path) for path in elsewhere]
        self.keys_given = 0
        self._pending: dict[str, bytes] = {}

    def key(self, value: Any, where: str) -> str:
        """The store key of one embedded picture/video (`where`: the field, for a row error); a `{bytes: None, path}`
        value refers to a file: a relative path stays a key under `data.images`, an absolute one is read."""
        if isinstance(value, Image.Image):
            data = _png(value, where)
        else:
            data, path = value.get("bytes"), value.get("path")
            if data is None:
                if not isinstance(path, str) or not path:
                    raise RowError("wrong_type", f"{where} holds neither bytes nor a path")
                if not PurePath(path).is_absolute():
                    return path
                try:
                    data = Path(path).read_bytes()
                except OSError as exc:
                    raise RowError("missing_image", f"{where}: cannot read {path} ({exc.strerror})") from exc
            if not isinstance(data, (bytes, bytearray)) or not data:
                raise RowError("wrong_type", f"{where} bytes are {type(data).__name__} of length {len(data or b'')}")
            data = bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        key = f"{EMBEDDED_PREFIX}{digest[:2]}/{digest}{_suffix(data)}"
        self._pending[key] = data
        self.keys_given += 1
        return key

    def commit(self) -> None:
        """Write the pictures named since the last commit (the loader kept their row)."""
        for key, data in self._pending.items():
            if not any(_stored(folder / key, len(data)) for folder in (self.folder, *self.elsewhere)):
                _write(self.folder / key, data)
        self._pending.clear()

    def discard(self) -> None:
        """Forget the pictures named since the last commit (their row was not kept)."""
        self._pending.clear()


class WithEmbedded:
    """An image store that reads embedded keys from the media folder (or from `elsewhere`, where `commit` found
    them) and every other key from `store` (the recipe's `data.images`, None when it names none)."""

    def __init__(
        self,
        folder: str | os.PathLike[str],
        store: ImageStore | None,
        elsewhere: Sequence[str | os.PathLike[str]] = (),
    ):
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.embedded = [FolderImageStore(path) for path in (folder, *elsewhere)]
        self.store = store

    def _store_for(self, key: str) -> ImageStore:
        if is_embedded_key(key):
            return next((store for store in self.embedded if store.exists(key)), self.embedded[0])
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
        return self.store.example() if self.store is not None else self.embedded[0].example()

    def __repr__(self) -> str:
        return f"WithEmbedded({str(self.embedded[0].root)!r}, {self.store!r})"

    def __str__(self) -> str:
        return str(self.store) if self.store is not None else str(self.embedded[0])
