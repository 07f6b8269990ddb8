"""Session-wide demo assets and helpers to run short trainings (in-process or as a subprocess)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from PIL import Image

from .conftest import REPO_ROOT

DEMO_RECIPE = REPO_ROOT / "dpo_config" / "demo.yaml"
# short in-process runs: no evaluation, a log line every step
FAST = ["training.eval_strategy=no", "data.eval_fraction=0.0", "training.logging_steps=1", "training.report_to=none"]


def read_metrics(working: Path) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    return [json.loads(line) for line in (working / "metrics.jsonl").read_text().splitlines()]


def make_assets(root: Path, n: int = 600) -> dict[str, Path]:
    """Tiny checkpoint + synthetic VLFeedback under `root`; returns the paths."""
    from silkie.dev.synthetic import write_synthetic_vlfeedback
    from silkie.dev.tiny_qwen_vl import build_tiny_checkpoint

    model = build_tiny_checkpoint(root / "tiny-qwen-vl")
    write_synthetic_vlfeedback(root / "vlfeedback", n=n, seed=0)
    return {
        "model": model,
        "jsonl": root / "vlfeedback" / "vlfeedback_80k.jsonl",
        "zip": root / "vlfeedback" / "merged_images.zip",
    }


def constant_image_zip(source: Path, target: Path) -> Path:
    """Copy of an images zip where every image is the same grey picture (the image carries no signal)."""
    buffer = io.BytesIO()
    Image.new("RGB", (56, 56), (128, 128, 128)).save(buffer, format="JPEG")
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, buffer.getvalue())
    return target


def asset_overrides(assets: dict[str, Path], images: Path | None = None) -> list[str]:
    """Overrides pointing the demo recipe at test assets."""
    return [f"model.path={assets['model']}", f"data.path={assets['jsonl']}", f"data.images={images or assets['zip']}"]


def run_in_process(working: Path, overrides: list[str]) -> dict:
    """`train_dpo.py` inside this process (fast: no re-import)."""
    from silkie.config import load_recipe
    from silkie.train import run_training

    return run_training(load_recipe(DEMO_RECIPE, overrides), working)


def train_command(working: Path, overrides: list[str]) -> list[str]:
    """Command line of a single training process."""
    return [
        sys.executable,
        str(REPO_ROOT / "train_dpo.py"),
        "--config",
        str(DEMO_RECIPE),
        "--working",
        str(working),
        *overrides,
    ]


def subprocess_env() -> dict[str, str]:
    """Environment for child training processes (offline, quiet, importable repo)."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_subprocess(working: Path, overrides: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run one training process to completion and return it (stdout+stderr captured)."""
    return subprocess.run(
        train_command(working, overrides), env=subprocess_env(), capture_output=True, text=True, timeout=timeout
    )
