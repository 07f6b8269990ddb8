"""Ranks that see text-only pairs while others see images, with a trained vision tower, on 2 CPU processes.

Every rank must run the tower at the same point of each step: ZeRO-3 gathers its parameters collectively, and
DDP / ZeRO-2 reduce its gradients across ranks. Before the blank-image pass ran inside the forward, DDP failed
("parameters that were not used"), ZeRO-2 crashed in gloo and ZeRO-3 stopped on a trace mismatch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .train_fixtures import DEMO_RECIPE, make_assets, subprocess_env


def mixed_preference_file(assets: dict[str, Path], target: Path, n: int = 64) -> Path:
    """Best vs worst answer per VLFeedback prompt as preference rows; every other row drops its image."""
    with open(assets["jsonl"]) as source, open(target, "w") as out:
        for i, line in enumerate(source):
            if i == n:
                break
            row = json.loads(line)
            ranked = sorted(row["completions"], key=total_rating)
            pair = {"id": row["id"], "prompt": row["prompt"], "chosen": ranked[-1]["response"]}
            pair["rejected"] = ranked[0]["response"]
            if i % 2 == 0:
                pair["image"] = f"merged_images/{row['id']}.jpg"
            out.write(json.dumps(pair) + "\n")
    return target


def total_rating(completion: dict) -> float:
    return sum(float(aspect["Rating"]) for aspect in completion["annotations"].values())


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory) -> tuple[dict[str, Path], Path]:
    root = tmp_path_factory.mktemp("mixed")
    assets = make_assets(root, n=64)
    return assets, mixed_preference_file(assets, root / "pairs.jsonl")


def train_two_ranks(assets: dict[str, Path], pairs: Path, working: Path, stage: int) -> list[float]:
    overrides = [
        f"model.path={assets['model']}",
        "data.source=preference",
        f"data.path={pairs}",
        f"data.images={assets['zip']}",
        "data.eval_fraction=0.0",
        f"deepspeed.stage={stage}",
        "lora.vision=true",
        "training.per_device_train_batch_size=1",
        "training.max_steps=12",
        "training.save_steps=100",
        "training.eval_strategy=no",
        "training.logging_steps=1",
        "training.report_to=none",
    ]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(Path(DEMO_RECIPE).parents[1] / "train_dpo.py"), "--config", str(DEMO_RECIPE),
               "--working", str(working), *overrides]  # fmt: skip
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = map(json.loads, (working / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in records if "loss" in r]


def test_trained_tower_with_text_only_ranks_under_ddp_zero2_and_zero3(mixed_data, tmp_path):
    assets, pairs = mixed_data
    ddp = train_two_ranks(assets, pairs, tmp_path / "ddp", stage=0)
    assert len(ddp) == 12 and ddp[0] == pytest.approx(0.6931, abs=1e-3)
    assert max(abs(loss - ddp[0]) for loss in ddp) > 1e-2, ddp  # the steps trained (the losses moved)
    for stage in (2, 3):
        zero = train_two_ranks(assets, pairs, tmp_path / f"zero{stage}", stage=stage)
        assert max(abs(a - b) for a, b in zip(ddp, zero, strict=True)) < 1e-3, (stage, ddp, zero)
