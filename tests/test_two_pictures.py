"""The two-pictures demo: its data can only be learned by comparing the pictures, and the README's command learns it
(held-out pairs right, and wrong once their two pictures are swapped)."""

from __future__ import annotations

import io
import json
import re
import sys
import zipfile
from collections import Counter

import pytest
from PIL import Image

from silkie.dev.two_pictures import PAIRS_NAME, ZIP_NAME, write_two_picture_pairs

from .conftest import REPO_ROOT
from .test_user_path import bash_blocks, run

README = (REPO_ROOT / "README.md").read_text()


def count_circles(image: Image.Image) -> int:
    """Connected non-background blobs (4-neighbour flood fill)."""
    width, height = image.size
    pixels = image.convert("RGB").load()
    seen, blobs = set(), 0
    for start in ((x, y) for y in range(height) for x in range(width)):
        if start in seen or sum(pixels[start]) > 600:  # background is (245, 245, 240)
            continue
        blobs += 1
        stack = [start]
        while stack:
            x, y = stack.pop()
            if (x, y) in seen or not (0 <= x < width and 0 <= y < height) or sum(pixels[x, y]) > 600:
                continue
            seen.add((x, y))
            stack += [(x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)]
    return blobs


def test_the_preference_is_the_comparison_and_the_text_alone_is_at_chance(tmp_path):
    summary = write_two_picture_pairs(tmp_path, n=96, seed=1)
    rows = [json.loads(line) for line in (tmp_path / PAIRS_NAME).read_text().splitlines()]
    assert summary["rows"] == len(rows) == 96 and summary["first_wins"] == 48
    orders, by_prompt = Counter(), Counter()
    with zipfile.ZipFile(tmp_path / ZIP_NAME) as archive:
        for row in rows:
            counts = [count_circles(Image.open(io.BytesIO(archive.read(key)))) for key in row["images"]]
            assert len(counts) == 2 and counts[0] != counts[1] and set(counts) <= {1, 2, 3, 4}, row
            winner, loser = ("first", "second") if counts[0] > counts[1] else ("second", "first")
            assert winner in row["chosen"] and row["rejected"] == row["chosen"].replace(winner, loser), row
            assert row["prompt"].count("<image>") in (0, 2)
            orders[tuple(counts)] += 1
            by_prompt[row["prompt"], winner] += 1
    assert len(orders) == 12 and set(orders.values()) == {8}  # every ordered pair of counts equally often
    assert len(set(p for p, _ in by_prompt)) == 4 and set(by_prompt.values()) == {12}  # each wording: half each way


@pytest.fixture(scope="module")
def two_pictures_run(tmp_path_factory):
    """The README's two-pictures command, as written, in a fresh folder."""
    command = next(b for b in bash_blocks(README) if "demo_two_pictures.yaml" in b).strip()
    cwd = tmp_path_factory.mktemp("two")
    outputs = []
    for step in command.split(" && "):
        words = step.split()
        assert words[0] == "python"
        words = [str(REPO_ROOT / w) if w.startswith(("dpo_config/", "scripts/", "launch_dpo.py")) else w for w in words]
        done = run([sys.executable, *words[1:]], cwd=cwd, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        outputs.append(done.stdout)
    return cwd, outputs[-1]


def test_the_demo_learns_to_compare_the_two_pictures(two_pictures_run, monkeypatch):
    from silkie.tools.evaluate import evaluate_run

    cwd, stdout = two_pictures_run
    accuracy = float(re.search(r"held-out reward accuracy: ([0-9.]+)", stdout).group(1))
    assert accuracy > 0.9  # measured 1.000; chance is 0.5
    working = cwd / "runs" / "two_pictures"
    final = json.loads((working / "final_metrics.json").read_text())
    assert final["eval_rewards/accuracies"] == pytest.approx(accuracy, abs=1e-3)
    # the same held-out pairs with each pair's two pictures swapped: the preference follows the pictures
    monkeypatch.chdir(cwd)  # config.yaml's paths are relative to where training ran
    data = cwd / "runs" / "assets" / "two_pictures"
    swapped_rows = []
    for line in (data / PAIRS_NAME).read_text().splitlines():
        row = json.loads(line)
        swapped_rows.append(json.dumps({**row, "images": row["images"][::-1]}))
    (cwd / "swapped.jsonl").write_text("\n".join(swapped_rows) + "\n")
    swapped = cwd / "swapped-run"
    swapped.mkdir()
    recipe = (working / "config.yaml").read_text()
    assert str(data / PAIRS_NAME) in recipe or f"runs/assets/two_pictures/{PAIRS_NAME}" in recipe
    recipe = re.sub(r"path: \S*two_pictures\.jsonl", f"path: {cwd / 'swapped.jsonl'}", recipe)
    (swapped / "config.yaml").write_text(recipe)
    as_trained = evaluate_run(working, device="cpu")["summary"]
    inverted = evaluate_run(swapped, adapter_dir=working / "adapter", device="cpu")
    assert as_trained["rewards/accuracies"] == pytest.approx(accuracy, abs=1e-3)
    assert inverted["split_size"] == as_trained["n_pairs"] and inverted["summary"]["rewards/accuracies"] < 0.2
