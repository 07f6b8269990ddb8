"""The working directory of a run: every name in it and every rule about it. Torch-free.

`<working>/` holds the resolved recipe (`config.yaml`), `checkpoint-N/` (staged as `tmp-checkpoint-N/`),
`metrics.jsonl` (and `eval_samples.jsonl` with `dpo.generate_during_eval`), tensorboard logs in `tb/`, the reference
cache in `reference_logps/`, tokenized data in `cache/`, and at the end `adapter/`, `final_metrics.json`,
`training_curves.png` and the `FINISHED` marker (`silkie evaluate` adds `eval_pairs_*.json` and `benchmarks/`);
an input error that stopped a start is kept in `ERROR`; Slurm
scripts and logs go to `slurm/`; `--force` moves old outputs into `backup-<time>/`.

Checkpoints:
A checkpoint is written as `tmp-checkpoint-N`, gets a manifest of its files (sizes and SHA-256) written last, and is
renamed to `checkpoint-N`. Before a resume the newest checkpoint is checked against its manifest (a checkpoint from
before manifests: its weights, optimizer and scheduler files must be there, and its JSON, safetensors and torch zip
files are checked for structure); one that fails is moved
aside as `corrupt-checkpoint-N-<time>/` (never deleted: the Trainer's rotation globs `checkpoint-*`, so the name
must not start with it) and the next older one is tried.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CONFIG_NAME = "config.yaml"
FINISHED_NAME = "FINISHED"
ERROR_NAME = "ERROR"  # the one-line input error that stopped the last start (a rerun would repeat it)
METRICS_NAME = "metrics.jsonl"
EVAL_SAMPLES_NAME = "eval_samples.jsonl"  # dpo.generate_during_eval: policy and reference answers per evaluation
FINAL_METRICS_NAME = "final_metrics.json"
PLOT_NAME = "training_curves.png"
ADAPTER_DIR = "adapter"
TENSORBOARD_DIR = "tb"
OLD_TENSORBOARD_DIR = "runs"  # where runs before tb/ wrote their tensorboard logs (transformers' default)
REFERENCE_DIR = "reference_logps"
CACHE_DIR = "cache"
SLURM_DIR = "slurm"
BACKUP_PREFIX = "backup-"
# What a finished run leaves behind that a new run in the same folder would overwrite.
FINISHED_OUTPUTS = (CONFIG_NAME, FINISHED_NAME, FINAL_METRICS_NAME, ADAPTER_DIR, PLOT_NAME)
EVAL_PAIRS_PREFIX = "eval_pairs_"  # `silkie evaluate`'s held-out scores: eval_pairs_<split>[_<corruption>].json
BENCH_DIR = "benchmarks"  # `silkie evaluate --tasks`: benchmarks/ (or benchmarks-limit<N>/ for a quick look)
# What `silkie evaluate` writes about the finished adapter (globs): it goes wherever the adapter goes.
EVALUATION_OUTPUTS = (f"{EVAL_PAIRS_PREFIX}*.json", BENCH_DIR, f"{BENCH_DIR}-limit*")
# What belongs to one recipe's history: moved aside too when the new run does not continue the old one.
RUN_HISTORY = (METRICS_NAME, EVAL_SAMPLES_NAME, TENSORBOARD_DIR, OLD_TENSORBOARD_DIR, REFERENCE_DIR)
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STAGING_PREFIX = "tmp-checkpoint"
STAGING_RE = re.compile(r"^tmp-checkpoint-(\d+)$")
CORRUPT_PREFIX = "corrupt-"
MANIFEST_NAME = "silkie_manifest.json"  # written last into each checkpoint: every other file's size and SHA-256
RUN_LAYOUT_FILE = "silkie_run.json"  # in each checkpoint: the number of processes that saved it (and more)
TRAINER_STATE_NAME = "trainer_state.json"
REFERENCE_SYNC_NAME = "reference_sync.safetensors"  # in each checkpoint of a TR-DPO run: the moving reference
_HASH_THREADS = 8  # hashlib releases the GIL on large reads: several files hash at once
_BLOCK = 1 << 24


def record_error(working: str | Path, message: str) -> bool:
    """Write `message` to `working/ERROR` for the launcher unless another process of the run already did; True
    when this call wrote it."""
    try:
        with open(Path(working) / ERROR_NAME, "x") as handle:
            handle.write(message + "\n")
    except OSError:  # FileExistsError (the first rank to fail wrote it), no run directory, a full disk
        return False
    return True


def checkpoints(working: Path) -> list[Path]:
    """Complete `checkpoint-N` folders in `working`, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(working).glob("checkpoint-*") if (m := CHECKPOINT_RE.match(p.name))]
    return [path for _, path in sorted(found)]


def latest_checkpoint(working: Path) -> Path | None:
    """The highest complete `checkpoint-N` in `working` (intact or not: see `resumable_checkpoint`)."""
    found = checkpoints(working)
    return found[-1] if found else None


def checkpoint_step(checkpoint: Path) -> int:
    """N of `checkpoint-N`."""
    match = CHECKPOINT_RE.match(checkpoint.name) or STAGING_RE.match(checkpoint.name)
    if match is None:
        raise ValueError(f"{checkpoint} is not a checkpoint folder")
    return int(match.group(1))


def remove_staging(working: Path) -> list[Path]:
    """Delete checkpoints that a killed run left half-written; returns what was removed."""
    removed = [p for p in Path(working).glob(f"{STAGING_PREFIX}-*") if STAGING_RE.match(p.name)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def world_size_problem(checkpoint: Path, world_size: int) -> str | None:
    """Why `checkpoint` cannot be resumed by `world_size` processes, or None (also for older checkpoints)."""
    path = checkpoint / RUN_LAYOUT_FILE
    try:
        saved = json.loads(path.read_text())["world_size"]
    except (FileNotFoundError, ValueError, KeyError, TypeError):  # an older checkpoint has none; a damaged one
        return None  # is moved aside by the resume's checksum
    if saved == world_size:
        return None
    return (
        f"{checkpoint.name} was saved by a run of {saved} processes and this launch has {world_size}: the global "
        f"batch, the data order and the optimizer shards would not match; launch {saved} processes again "
        f"(launch.nproc_per_node={saved} on one machine, --gpus {saved} on Slurm), or train in another --working"
    )


def folder_bytes(folder: Path) -> int:
    """Total size of the files under `folder` (0 when it does not exist)."""
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)


def write_manifest(folder: Path) -> Path:
    """Record every file of `folder` (relative path, size, SHA-256) in its manifest; call it after the last write."""
    folder = Path(folder)
    files = _files(folder)
    with ThreadPoolExecutor(max_workers=_HASH_THREADS) as pool:
        digests = list(pool.map(_sha256, files))
    entries = {
        path.relative_to(folder).as_posix(): {"size": path.stat().st_size, "sha256": digest}
        for path, digest in zip(files, digests)
    }
    staged = folder / f"{MANIFEST_NAME}.tmp"
    staged.write_text(json.dumps({"version": 1, "files": entries}, indent=1))
    os.replace(staged, folder / MANIFEST_NAME)
    return folder / MANIFEST_NAME


def verify_checkpoint(checkpoint: Path, checksums: bool = True) -> str | None:
    """Why `checkpoint` cannot be resumed (one phrase naming the file), or None when it is intact.

    With a manifest: every listed file exists with its size (and, with `checksums`, its SHA-256). Without one
    (saved before manifests): the trainer state and every JSON, safetensors and torch zip file is checked for
    structure."""
    checkpoint = Path(checkpoint)
    manifest = checkpoint / MANIFEST_NAME
    if not manifest.is_file():
        return _structure_problem(checkpoint)
    try:
        entries = json.loads(manifest.read_text())["files"]
        expected = {name: (int(entry["size"]), str(entry["sha256"])) for name, entry in entries.items()}
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return f"{MANIFEST_NAME} is not a readable manifest"
    for name, (size, _) in expected.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
    if checksums:
        names = list(expected)
        with ThreadPoolExecutor(max_workers=_HASH_THREADS) as pool:
            digests = pool.map(lambda name: _sha256(checkpoint / name), names)
            for name, digest in zip(names, digests):
                if digest != expected[name][1]:
                    return f"{name} does not match its SHA-256 in the manifest"
    return None


def _structure_problem(checkpoint: Path) -> str | None:
    state = checkpoint / TRAINER_STATE_NAME
    if not state.is_file():
        return f"{TRAINER_STATE_NAME} is missing"
    deepspeed = any(checkpoint.glob("global_step*/*optim_states.pt"))  # its shards hold weights, optimizer (and
    # the schedule, where accelerate wraps it)
    if not deepspeed:
        if not any((checkpoint / name).is_file() for name in _WEIGHT_FILES):
            return "no weights (adapter_model.safetensors, model.safetensors or their .bin) are in it"
        if not (checkpoint / "optimizer.pt").is_file():
            return "optimizer.pt is missing (a resume would start a fresh optimizer)"
        if not (checkpoint / "scheduler.pt").is_file():
            return "scheduler.pt is missing (a resume would restart the learning-rate schedule)"
    for path in sorted(checkpoint.rglob("*")):
        if not path.is_file():
            continue
        name = path.relative_to(checkpoint).as_posix()
        problem = None
        if path.suffix == ".json":
            problem = _json_problem(path)
        elif path.suffix == ".safetensors":
            problem = _safetensors_problem(path)
        elif path.suffix in (".pt", ".pth", ".bin"):
            problem = _torch_zip_problem(path)
        if problem:
            return f"{name} {problem}"
    return None


# The weight files a Trainer checkpoint holds: a LoRA adapter, or the whole model (one file or sharded).
_WEIGHT_FILES = (
    "adapter_model.safetensors",
    "adapter_model.bin",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def holds_training_output(folder: Path) -> bool:
    """True when a run left something a new recipe must not silently replace (checkpoints, metrics, outputs)."""
    logs_only = (CONFIG_NAME, TENSORBOARD_DIR, OLD_TENSORBOARD_DIR)
    names = [name for name in FINISHED_OUTPUTS + RUN_HISTORY if name not in logs_only]
    return any((folder / name).exists() for name in names) or any(Path(folder).glob("*checkpoint-*"))


def holds_run(folder: Path) -> bool:
    """True when `folder` holds a training run: its recipe and what the run left (`holds_training_output`), which
    only the launcher's --force may move aside."""
    return (Path(folder) / CONFIG_NAME).is_file() and holds_training_output(Path(folder))


def _json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        return f"is not valid JSON ({type(err).__name__})"
    return None


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"is truncated ({size} bytes)"
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            return f"is truncated ({size} bytes; its header alone needs {length + 8})"
        try:
            header = json.loads(handle.read(length))
        except (ValueError, UnicodeDecodeError):
            return "has an unreadable header"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    needed = 8 + length + max(ends, default=0)
    return None if needed == size else f"has {size} bytes, its header says {needed}"


def _torch_zip_problem(path: Path) -> str | None:
    """torch.save files are zip archives with a CRC per record: check them all (a legacy pickle is let through)."""
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic[:1] == b"\x80":  # the pickle protocol opcode of torch's legacy (non-zip) format: nothing to check
        return None
    if magic != b"PK\x03\x04":
        return "is not a torch.save archive"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f"is a damaged archive ({err})"
    return None if bad is None else f"has a damaged record ({bad})"


def quarantine(checkpoint: Path) -> Path:
    """Move a checkpoint that failed its check to `corrupt-checkpoint-N-<time>/` beside it; returns the new path."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = checkpoint.with_name(f"{CORRUPT_PREFIX}{checkpoint.name}-{stamp}")
    suffix = 1
    while target.exists():
        target = checkpoint.with_name(f"{CORRUPT_PREFIX}{checkpoint.name}-{stamp}-{suffix}")
        suffix += 1
    checkpoint.rename(target)
    return target


def resume_plan(working: Path, checksums: bool = True) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest checkpoint that passes `verify_checkpoint`, [(each newer one that fails, why)])."""
    damaged = []
    for checkpoint in reversed(checkpoints(working)):
        problem = verify_checkpoint(checkpoint, checksums=checksums)
        if problem is None:
            return checkpoint, damaged
        damaged.append((checkpoint, problem))
    return None, damaged


def resumable_checkpoint(working: Path, say: Callable[[str], None]) -> Path | None:
    """The newest checkpoint that passes `verify_checkpoint`; newer ones that fail are quarantined (one line each
    through `say`). Run it on one process of the run (the others then read `latest_checkpoint`)."""
    intact, damaged = resume_plan(working)
    for checkpoint, problem in damaged:
        moved = quarantine(checkpoint)
        older = f"resuming from {intact.name}" if intact else "no intact checkpoint is left: starting from step 0"
        say(f"{checkpoint.name} is damaged ({problem}): moved to {moved.name}/; {older}")
    return intact


def checkpoint_status(working: Path) -> str:
    """Where a stopped run stands, for the launcher's last line (sizes checked, not checksums: it is quick)."""
    return describe_resume(*resume_plan(working, checksums=False))


def describe_resume(intact: Path | None, damaged: list[tuple[Path, str]]) -> str:
    """`resume_plan`'s answer as the launcher says it: the checkpoint a relaunch goes on from, or why none."""
    if not damaged:
        return f"the last complete checkpoint, {intact}, is intact" if intact else "no checkpoint had been written yet"
    newest, problem = damaged[0]
    then = f"resumes from {intact}" if intact else "starts from step 0"
    return f"{newest} is damaged ({problem}): the next launch moves it aside and {then}"


def rotate_checkpoints(working: Path, limit: int | None, keep: Path | None = None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond `limit`, never the newest one nor `keep` (the best one);
    only `checkpoint-N` folders count (not staged or quarantined ones). Returns what was deleted."""
    if not limit or limit <= 0:
        return []
    found = checkpoints(working)
    protected = {found[-1].resolve()} if found else set()
    if keep is not None:
        protected.add(Path(keep).resolve())
    removed = []
    excess = len(found) - max(limit, len(protected))
    for checkpoint in found:
        if excess <= 0:
            break
        if checkpoint.resolve() not in protected:
            shutil.rmtree(checkpoint, ignore_errors=True)
            removed.append(checkpoint)
            excess -= 1
    return removed
