"""Precomputed reference log-probs: one no-grad pass over a dataset, cached in the working directory.

The cache is keyed by the tokenized data, the model checkpoint and the options that change the
numbers; a cache with another key is rebuilt, never reused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from silkie.config.checkpoint import cached_snapshot


def model_fingerprint(model_dir: str | Path) -> str:
    """Hash of config.json and, per weight file, its name, size and first/last MiB (a hub id's cached snapshot;
    the id itself when nothing is on disk)."""
    folder = cached_snapshot(model_dir)
    if folder is None or not (folder / "config.json").is_file():
        return hashlib.sha256(f"id:{model_dir}".encode()).hexdigest()
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as handle:
            digest.update(handle.read(1 << 20))
            handle.seek(max(0, size - (1 << 20)))
            digest.update(handle.read(1 << 20))
    return digest.hexdigest()


def reference_cache_key(data_fingerprint: str, model_dir: str | Path, options: dict) -> str:
    """Key of a reference-log-prob cache: data + model + recipe options."""
    payload = json.dumps({"data": data_fingerprint, "model": model_fingerprint(model_dir), **options}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def load_cached(path: Path, key: str, size: int, columns: int = 2) -> torch.Tensor | None:
    """The cached [size, columns] table if `path` holds one for `key`, else None."""
    if not path.is_file():
        return None
    stored = torch.load(path, map_location="cpu", weights_only=True)
    if stored.get("key") != key or tuple(stored["logps"].shape) != (size, columns):
        return None
    return stored["logps"]


def compute_reference_table(
    dataset: Dataset,
    collate: Callable,
    score_batch: Callable[[dict], tuple[torch.Tensor, ...]],
    batch_size: int,
    device: torch.device,
    progress: str | None = None,
    columns: int = 2,
) -> torch.Tensor:
    """[N, columns] reference log-probs ((chosen, rejected), and the same under the corrupted images for 4); each
    rank scores rows rank::world, then all ranks share. `progress`: a progress bar with this label (this rank's
    batches)."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    indices = list(range(rank, len(dataset), world))
    per_rank = -(-len(dataset) // world)  # every rank runs the same number of batches (ZeRO-3 gathers per forward)
    indices += [indices[-1] if indices else 0] * (per_rank - len(indices))
    loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size, collate_fn=collate)
    rows, values = [], []
    with torch.no_grad():
        for batch in tqdm(loader, desc=progress, disable=progress is None, unit="batch"):
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            logps = score_batch(batch)
            kept = batch["pair_weight"].cpu() > 0  # a pair whose image failed stays NaN (scored on the fly)
            rows.append(batch["pair_index"].cpu()[kept])
            values.append(torch.stack(list(logps), dim=1).float().cpu()[kept])
    local = (
        torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long),
        torch.cat(values) if values else torch.zeros(0, columns),
    )
    shards = [local]
    if world > 1:
        shards = [None] * world
        dist.all_gather_object(shards, local)
    table = torch.full((len(dataset), columns), float("nan"))
    for index, logps in shards:
        table[index] = logps
    return table


def save_table(path: Path, key: str, table: torch.Tensor) -> None:
    """Write the cache atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp")
    torch.save({"key": key, "logps": table}, staging)
    staging.replace(path)


@dataclass
class ReferencePass:
    """How to score the reference over a dataset, as the trainer does it: no-grad scoring of a collated batch,
    the collator, the batch size and device, and the run's process facts."""

    score_batch: Callable[[dict], tuple[torch.Tensor, ...]]
    collate: Callable
    batch_size: int
    device: torch.device
    is_main: bool
    show_progress: bool
    wait_for_everyone: Callable[[], None]
    say: Callable[[str], None]
    columns: int = 2  # 4: also the corrupted-image view's (chosen, rejected)


class ReferenceCache:
    """Per-split reference tables stored as `<directory>/<split>.pt`, keyed by data + model + options."""

    def __init__(self, directory: str | Path, model_dir: str | Path, options: dict):
        self.directory = Path(directory)
        self.model_dir = model_dir
        self.options = options

    def table(self, split: str, dataset, scoring: ReferencePass) -> torch.Tensor:
        """Load the split's table if its key matches, else compute it with `scoring` (all ranks) and save it."""
        key = reference_cache_key(dataset._fingerprint, self.model_dir, self.options)
        path = self.directory / f"{split}.pt"
        cached = load_cached(path, key, len(dataset), scoring.columns)
        if cached is not None:
            scoring.say(f"reference log-probs ({split}): reusing {path}")
            return cached
        reason = "another data/model/recipe" if path.exists() else "no cache yet"
        scoring.say(f"reference log-probs ({split}): computing {len(dataset)} pairs ({reason})")
        table = compute_reference_table(
            dataset,
            scoring.collate,
            scoring.score_batch,
            scoring.batch_size,
            scoring.device,
            progress=f"reference log-probs ({split})" if scoring.show_progress else None,
            columns=scoring.columns,
        )
        missing = int(torch.isnan(table[:, 0]).sum())
        if missing:  # pairs whose image failed to load: weight 0 in training too (scored on the fly if it loads)
            scoring.say(f"reference log-probs ({split}): {missing} pairs unscored (their images failed to load)")
        if scoring.is_main:
            save_table(path, key, table)
        scoring.wait_for_everyone()
        return table
