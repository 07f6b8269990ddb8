"""Training on a preference file with videos and several images (Qwen2-VL families; files under data.images, or held
in the rows): the loss goes down, the cached reference holds every pair (its corrupted videos too), and `silkie
evaluate` scores the run as the trainer did."""

from __future__ import annotations

import json
from itertools import permutations
from pathlib import Path

import pytest
from PIL import Image

from silkie.config import load_recipe
from silkie.dev.clips import colour_clip
from silkie.train import run_training

from .conftest import REPO_ROOT
from .hf_fixtures import BUILDERS

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220)}


def write_video_pairs(root: Path, n: int = 48) -> Path:
    """Rows asking which colour a clip ends with (4 frames: two of one colour, two of another), every other row
    with a picture of a third colour before the clip (`<image>` then `<video>` markers)."""
    media = root / "media"
    media.mkdir(parents=True)
    orders = list(permutations(sorted(COLOURS), 2))
    rows = []
    for index in range(n):
        start, end = orders[index % len(orders)]
        clip = f"clips/{index:03d}.mkv"
        (media / clip).parent.mkdir(exist_ok=True)
        (media / clip).write_bytes(colour_clip([COLOURS[start]] * 2 + [COLOURS[end]] * 2, size=(56, 56), fps=2))
        row = {"id": f"v{index}", "prompt": "Which colour does the clip end with?", "videos": [clip]}
        if index % 2:
            (other,) = set(COLOURS) - {start, end}
            picture = f"pictures/{index:03d}.png"
            (media / picture).parent.mkdir(exist_ok=True)
            Image.new("RGB", (56, 56), COLOURS[other]).save(media / picture)
            row.update(prompt="Here is <image> and a clip <video>. Which colour does the clip end with?")
            row["images"] = [picture]
        rows.append({**row, "chosen": f"It ends {end}.", "rejected": f"It ends {start}."})
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def held_in_rows(jsonl: Path, media: Path) -> Path:
    """The same pairs as a parquet whose rows hold their pictures and clips (`{bytes, path}`, as a `datasets` Image
    column stores them), the layout of TRL's hub datasets."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    for row in rows:
        for name in ("images", "videos"):  # every row has both keys: pyarrow takes the columns from the first row
            row[name] = [{"bytes": (media / key).read_bytes(), "path": None} for key in row.get(name, [])]
    path = jsonl.with_suffix(".parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_video_pairs(tmp_path_factory.mktemp("video-pairs"))


@pytest.mark.parametrize(
    ("family", "media"),
    [("qwen2_vl", "files"), ("qwen2_5_vl", "held in rows"), ("qwen3_vl", "files"), ("internvl", "files")],
)
def test_video_pairs_train_with_the_cached_reference_and_evaluate_as_trained(family, media, pairs, tmp_path):
    from silkie.tools.evaluate import evaluate_run

    model_dir = BUILDERS[family](tmp_path / family)
    where = [f"data.path={pairs}", f"data.images={pairs.parent / 'media'}"]
    if media == "held in rows":  # no data.images: the run writes them into its data cache
        where = [f"data.path={held_in_rows(pairs, pairs.parent / 'media')}", "data.images=null"]
    overrides = [
        f"model.path={model_dir}",
        f"model.family={family}",
        "data.source=preference",
        *where,
        "data.eval_fraction=0.25",
        "data.video_fps=2",
        "data.video_max_frames=4",
        "dpo.precompute_ref_log_probs=true",
        "dpo.loss_type=mdpo",
        "data.image_corruption=noise",  # a crop of a one-colour frame is the same frame
        "training.max_steps=10",
        "training.per_device_train_batch_size=4",
        "training.eval_strategy=steps",
        "training.eval_steps=10",
        "training.logging_steps=1",
        "training.report_to=none",
        "training.lr_scheduler_type=constant",
        "training.warmup_ratio=0.0",
        "training.learning_rate=3e-3",
    ]
    working = tmp_path / "run"
    recipe = "demo_internvl" if family == "internvl" else "demo_qwen2_vl"  # the Qwen one bounds image pixels
    final = run_training(load_recipe(REPO_ROOT / "dpo_config" / f"{recipe}.yaml", overrides), working)
    records = [json.loads(line) for line in (working / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 10 and all(loss == loss for loss in losses)  # finite
    assert sum(losses[-3:]) / 3 < losses[0] - 0.05, losses
    import torch

    table = torch.load(working / "reference_logps" / "train.pt", weights_only=True)["logps"]
    assert table.shape == (36, 4) and torch.isfinite(table).all()  # every pair; columns 2-3: corrupted videos
    assert (table[:, :2] - table[:, 2:]).abs().min() > 1e-4  # the corrupted view is another input
    result = evaluate_run(working, device="cpu")
    assert result["split_size"] == result["summary"]["n_pairs"] == 12 and result["dropped_pairs"] == 0
    assert result["summary"]["rewards/accuracies"] == pytest.approx(final["eval_rewards/accuracies"], abs=1e-6)
    assert result["summary"]["logps/chosen"] == pytest.approx(final["eval_logps/chosen"], rel=1e-4)
    if media == "held in rows":  # one file per distinct picture and clip, read from the run's cache
        distinct = {path.read_bytes() for path in (pairs.parent / "media").rglob("*.*")}
        written = list((working / "cache" / "media" / "embedded").rglob("*.*"))
        assert {path.read_bytes() for path in written} == distinct and len(written) == len(distinct) < 48 + 24
