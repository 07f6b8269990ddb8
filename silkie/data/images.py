"""Lazy image stores for VLFeedback-style image keys (`merged_images/<id>.jpg`).

Images are read one at a time, on demand: a zip is never extracted, and the zip handle
is opened lazily per process id so a store object can be forked into DataLoader workers
(or pickled for spawned ones) without sharing a file handle.
"""

from __future__ import annotations

import io
import os
import threading
import zipfile
from pathlib import Path
from typing import Protocol

from PIL import Image, ImageOps

from silkie.errors import InputError, MissingInputError

IMAGE_PREFIX = "merged_images/"
IMAGE_SUFFIX = ".jpg"


class ImageLoadError(Exception):
    """An image (or video: `what`) that is missing or cannot be decoded."""

    def __init__(self, key: str, reason: str, what: str = "image"):
        super().__init__(f"cannot load {what} {key!r}: {reason}")
        self.key = key
        self.reason = reason


class ImageStore(Protocol):
    """What the pair builder and the collator need from an image source."""

    def exists(self, key: str) -> bool:
        """Whether `key` names a readable member/file."""
        ...

    def open(self, key: str) -> Image.Image:
        """The image behind `key`, RGB and fully loaded."""
        ...

    def read_bytes(self, key: str) -> bytes:
        """The stored bytes behind `key` (a video's, decoded by `silkie.data.video`)."""
        ...

    def example(self) -> str | None:
        """One stored file's name (for an error that has to say where the files are), None when it is empty."""
        ...


def image_key(row_id: str | None = None, img_path: str | None = None) -> str:
    """The canonical store key for a row: from `img_path` when given, else `merged_images/<id>.jpg`."""
    if img_path:
        path = img_path.replace("\\", "/").strip()
        while path.startswith("./"):
            path = path[2:]
        if IMAGE_PREFIX in path:
            return IMAGE_PREFIX + path.rsplit(IMAGE_PREFIX, 1)[1]
        if "/" not in path:
            return IMAGE_PREFIX + path
        return path
    if row_id is None or str(row_id) == "":
        raise ValueError("image_key needs a row id or an img_path")
    return f"{IMAGE_PREFIX}{row_id}{IMAGE_SUFFIX}"


def key_candidates(key: str) -> list[str]:
    """Spellings of `key` to try: as given, then without / with the `merged_images/` prefix."""
    key = key.replace("\\", "/")
    while key.startswith("./"):
        key = key[2:]
    if key.startswith(IMAGE_PREFIX):
        return [key, key[len(IMAGE_PREFIX) :]]
    return [key, IMAGE_PREFIX + key]


# how stored bytes become pixels; part of the reference cache's key (a change of it changes the log-probs)
DECODE_VERSION = "exif-upright-8bit-rgb"


def decode_image(key: str, data: bytes) -> Image.Image:
    """Decode image bytes into a fully loaded RGB image, upright as viewers show it (EXIF orientation applied, as
    `transformers.image_utils.load_image` and `datasets` do), or raise `ImageLoadError`."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            try:
                upright = ImageOps.exif_transpose(opened)
            except Exception:  # malformed EXIF (PIL has crashed on some): the pixels as stored are still usable
                upright = opened
            return _to_8bit(upright).convert("RGB")
    except Image.DecompressionBombError as exc:  # PIL's limit (Image.MAX_IMAGE_PIXELS) against memory blow-ups
        raise ImageLoadError(key, f"too large to decode ({exc})") from exc
    except Exception as exc:  # PIL raises many types for corrupt data
        raise ImageLoadError(key, f"corrupt image ({type(exc).__name__}: {exc})") from exc


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float greyscale as 8 bits (PIL's own conversion clips them to white/black)."""
    if not (image.mode.startswith("I") or image.mode == "F"):
        return image
    import numpy as np

    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        top = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0  # [0, 1] floats, else already in 8-bit range
    else:
        top = 65535.0 if values.max(initial=0.0) > 255 else 255.0
    return Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")


class ZipImageStore:
    """Reads single members of a zip (e.g. `merged_images.zip`) without extracting it."""

    def __init__(self, zip_path: str | os.PathLike[str]):
        self.zip_path = Path(zip_path)
        if not self.zip_path.is_file():
            raise MissingInputError(f"image zip not found: {self.zip_path}")
        self._zip: zipfile.ZipFile | None = None
        self._names: frozenset[str] = frozenset()
        self._root = ""  # a folder above merged_images/ that every such member shares (a re-zipped release)
        self._pid: int | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_zip=None, _names=frozenset(), _root="", _pid=None, _lock=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _archive(self) -> tuple[zipfile.ZipFile, frozenset[str]]:
        pid = os.getpid()
        if self._zip is None or self._pid != pid:
            with self._lock:
                if self._zip is None or self._pid != pid:
                    archive = zipfile.ZipFile(self.zip_path)
                    self._names = frozenset(archive.namelist())
                    roots = {  # macOS's "Compress" adds __MACOSX/.../._name twins: not where the pictures are
                        name[: name.index(IMAGE_PREFIX)]
                        for name in self._names
                        if IMAGE_PREFIX in name and not name.startswith("__MACOSX/")
                    }
                    self._root = roots.pop() if len(roots) == 1 else ""
                    self._zip, self._pid = archive, pid
        return self._zip, self._names

    def _member(self, key: str) -> str | None:
        _, names = self._archive()
        candidates = key_candidates(key)
        if self._root:
            candidates += [self._root + name for name in candidates]
        return next((name for name in candidates if name in names), None)

    def example(self) -> str | None:
        """The first file member's name."""
        _, names = self._archive()
        return min((name for name in names if not name.endswith("/")), default=None)

    def exists(self, key: str) -> bool:
        """Whether the zip holds `key` (with or without the `merged_images/` prefix)."""
        return self._member(key) is not None

    def read_bytes(self, key: str) -> bytes:
        """One member's bytes; raises `ImageLoadError` when missing or unreadable."""
        member = self._member(key)
        if member is None:
            raise ImageLoadError(key, f"not in {self.zip_path.name}")
        archive, _ = self._archive()
        try:
            return archive.read(member)
        except (zipfile.BadZipFile, OSError, KeyError) as exc:
            raise ImageLoadError(key, f"unreadable zip member ({exc})") from exc

    def open(self, key: str) -> Image.Image:
        """Read and decode one member; raises `ImageLoadError` when missing or corrupt."""
        return decode_image(key, self.read_bytes(key))

    def close(self) -> None:
        """Close this process's handle (it is reopened on the next read)."""
        if self._zip is not None and self._pid == os.getpid():
            self._zip.close()
        self._zip, self._pid = None, None

    def __repr__(self) -> str:
        return f"ZipImageStore({str(self.zip_path)!r})"

    def __str__(self) -> str:
        return str(self.zip_path)


class FolderImageStore:
    """Reads images from a folder: `root/merged_images/<id>.jpg` or `root/<id>.jpg`."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        if not self.root.is_dir():
            raise MissingInputError(f"image folder not found: {self.root}")
        self._resolved_root = self.root.resolve()

    def _path(self, key: str) -> Path | None:
        for candidate in key_candidates(key):
            path = (self.root / candidate).resolve()
            if not path.is_relative_to(self._resolved_root):
                continue
            if path.is_file():
                return path
        return None

    def exists(self, key: str) -> bool:
        """Whether a file for `key` exists under the root."""
        return self._path(key) is not None

    def read_bytes(self, key: str) -> bytes:
        """One file's bytes; raises `ImageLoadError` when missing or unreadable."""
        path = self._path(key)
        if path is None:
            raise ImageLoadError(key, f"no such file under {self.root}")
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ImageLoadError(key, f"unreadable file ({exc})") from exc

    def open(self, key: str) -> Image.Image:
        """Read and decode one file; raises `ImageLoadError` when missing or corrupt."""
        return decode_image(key, self.read_bytes(key))

    def example(self) -> str | None:
        """The first file's path under the root (in walk order, directories sorted)."""
        for folder, subfolders, files in os.walk(self.root):
            subfolders.sort()
            files = [name for name in files if not name.startswith(".")]  # e.g. a staging file left by a crash
            if files:
                return str((Path(folder) / min(files)).relative_to(self.root))
        return None

    def __repr__(self) -> str:
        return f"FolderImageStore({str(self.root)!r})"

    def __str__(self) -> str:
        return f"{self.root}/"


def open_image_store(path: str | os.PathLike[str]) -> ZipImageStore | FolderImageStore:
    """A store for `path`: a `.zip` file -> `ZipImageStore`, a directory -> `FolderImageStore`."""
    path = Path(path)
    if path.suffix.lower() == ".zip":
        return ZipImageStore(path)
    if path.is_dir():
        return FolderImageStore(path)
    if not path.exists():
        raise MissingInputError(f"image source not found: {path}")
    raise InputError(f"image source must be a .zip file or a directory, got {path}")
