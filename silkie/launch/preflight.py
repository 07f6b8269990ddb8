"""Before a launch: do the recipe's input paths exist? (torch-free; seconds instead of a failed start)."""

from __future__ import annotations

import os
from pathlib import Path

from silkie.config import Recipe
from silkie.config.checkpoint import checkpoint_problem
from silkie.config.names import HUB_ID
from silkie.config.trackers import missing_trackers
from silkie.errors import InputError
from silkie.logs import LAUNCH, get_logger

notes = get_logger(LAUNCH)


def _cached_hub_ids() -> set[str]:
    from huggingface_hub import scan_cache_dir

    try:
        return {repo.repo_id for repo in scan_cache_dir().repos}
    except Exception:  # no cache folder yet
        return set()


def _hub_id_problem(key: str, value: str) -> str | None:
    """Why `value`, which is no local path, cannot be a hub id here (None when it can). Online, a hub id that is
    not cached is looked up (seconds, instead of a failure after torchrun started and the data was tokenized)."""
    local = f" (for a local folder write ./{value})" if not value.startswith(("./", "/", "~")) else ""
    if not HUB_ID.match(value) or Path(value.split("/")[0]).is_dir():  # "checkpoints/Qwen-VL-Chat": a local typo
        return f"{key}: {value} does not exist"
    if value in _cached_hub_ids():
        return None
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return f"{key}: {value} is no local folder, and HF_HUB_OFFLINE is set with no cached copy of that hub id{local}"
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().model_info(value, timeout=10)
    except GatedRepoError:  # it exists; the download will say whether this token may read it
        return None
    except RepositoryNotFoundError:
        return f"{key}: {value} is neither a local folder nor a model on the hub{local}"
    except Exception as err:  # no network, a proxy, a hub outage: the run itself will try again
        notes.warning(f"{key}: {value} is no local folder and not in the hub cache; the hub could not be asked "
                      f"({type(err).__name__}), so training will try to download it{local}")  # fmt: skip
    return None


def missing_inputs(recipe: Recipe) -> list[str]:
    """One line per input path of the recipe that cannot be found (model, data, images), for a model folder that
    is no checkpoint of `model.family` (no config.json, another family's model_type), and for a `report_to`
    tracker that is not installed."""
    checks = [
        ("model.path", recipe.model.path, True, "a checkpoint folder or a hub id"),
        ("model.ref_model", recipe.model.ref_model, True, "the reference's checkpoint folder or a hub id"),
        ("data.path", recipe.data.path, recipe.data.source == "hf", f"the {recipe.data.source} data"),
        ("data.eval_path", recipe.data.eval_path, recipe.data.source == "hf", "the held-out pairs"),
        ("data.images", recipe.data.images, False, "the images zip or folder"),
    ]
    problems = []
    for key, value in (("model.path", recipe.model.path), ("model.ref_model", recipe.model.ref_model)):
        model = Path(value).expanduser() if value else None
        if model is not None and model.is_dir():  # a folder of the wrong kind: said now, not after torchrun started
            try:
                problem = checkpoint_problem(model, recipe.model.family, key)
            except InputError as err:
                problem = str(err)
            if problem:
                problems.append(problem)
    tracker = missing_trackers(recipe.training)
    if tracker:
        problems.append(tracker)
    for key, value, hub_ok, expected in checks:
        path = Path(value).expanduser() if value else None
        wrong_kind = path is not None and path.is_file() and (
            key.startswith("model.") or (key == "data.images" and path.suffix.lower() != ".zip"))  # fmt: skip
        if wrong_kind:
            problems.append(f"{key}: {value} is a file (expected {expected})")
        if path is None or path.exists():
            continue
        problem = _hub_id_problem(key, value) if hub_ok else f"{key}: {value} does not exist"
        if problem:
            problems.append(f"{problem} (expected {expected}; relative paths are from {Path.cwd()})")
    return problems
