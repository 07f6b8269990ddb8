"""A small offline lmms-eval task about the synthetic shapes (the demo's pictures), for tests and the README demo:
`silkie_shapes`, MME-style yes/no questions, two per picture (one true, one false) in MME's perception categories
`existence` (the shape), `color` and `count`, scored by lmms-eval's own MME functions (`mme_perception_score`: per
category accuracy + accuracy+ over the picture's pair, x100, summed over categories; at most 600 here).

`write_shapes_task(folder)` writes the YAML file, its `utils.py` and the dataset (`datasets` on disk, pictures
embedded), so `lmms-eval --include_path folder --tasks silkie_shapes` runs without a hub."""

from __future__ import annotations

import random
from pathlib import Path

from silkie.dev.synthetic import ALL_SCENES, COLOURS, NUMBER_WORDS, SHAPES, Scene, draw_scene

TASK = "silkie_shapes"
CATEGORIES = ("existence", "color", "count")
QUESTION_SUFFIX = " Please answer yes or no."

UTILS = '''"""lmms-eval functions of the silkie_shapes tasks (written by silkie.dev.lmms_task)."""

from lmms_eval.tasks.mme.utils import mme_aggregate_results, mme_doc_to_text, mme_process_results  # noqa: F401


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]

'''

YESNO_YAML = f"""task: {TASK}
dataset_path: {{data}}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.mme_doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 8
  temperature: 0
  do_sample: false
process_results: !function utils.mme_process_results
metric_list:
  - metric: mme_perception_score
    aggregation: !function utils.mme_aggregate_results
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "\\nAnswer the question using a single word or phrase."
metadata:
  version: 0.0
"""


def yes_no_questions(scene: Scene, category: str, rng: random.Random) -> list[tuple[str, str]]:
    """(question, answer) of one picture: one true and one false statement about `category`."""
    noun = lambda shape, count: shape if count == 1 else f"{shape}s"  # noqa: E731
    if category == "existence":
        other = rng.choice([s for s in SHAPES if s != scene.shape])
        claims = [(scene.shape, "yes"), (other, "no")]
        return [(f"Is there a {shape} in the image?{QUESTION_SUFFIX}", answer) for shape, answer in claims]
    if category == "color":
        other = rng.choice([c for c in COLOURS if c != scene.colour])
        claims = [(scene.colour, "yes"), (other, "no")]
        return [(f"Are the shapes in the image {c}?{QUESTION_SUFFIX}", answer) for c, answer in claims]
    other = rng.choice([n for n in NUMBER_WORDS if n != scene.count])
    claims = [(scene.count, "yes"), (other, "no")]
    return [
        (f"Are there {NUMBER_WORDS[n]} {noun(scene.shape, n)} in the image?{QUESTION_SUFFIX}", answer)
        for n, answer in claims
    ]


def shapes_rows(pictures: int, seed: int = 0, size: int = 64) -> list[dict]:
    """The task's rows over `pictures` synthetic pictures (two questions each), scenes and categories cycled."""
    rng = random.Random(seed)
    rows = []
    for index in range(pictures):
        scene = ALL_SCENES[(index * 7) % len(ALL_SCENES)]
        image = draw_scene(scene, size, rng)
        category = CATEGORIES[index % len(CATEGORIES)]
        picture_id = f"shapes_{index:04d}.png"
        for question, answer in yes_no_questions(scene, category, rng):
            rows.append(
                {"question_id": picture_id, "image": image, "question": question, "answer": answer,
                 "category": category}
            )  # fmt: skip
    return rows


def write_shapes_task(folder: str | Path, pictures: int = 6, seed: int = 0) -> Path:
    """Write the task (YAML + utils.py + dataset) into `folder`; returns it (lmms-eval's `--include_path`)."""
    import datasets

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = shapes_rows(pictures, seed)
    columns = {key: [row[key] for row in rows] for key in rows[0]}
    features = datasets.Features(
        {key: datasets.Image() if key == "image" else datasets.Value("string") for key in columns}
    )
    data = folder / f"{TASK}_data"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(columns, features=features)}).save_to_disk(data)
    (folder / f"{TASK}.yaml").write_text(YESNO_YAML.format(data=data.resolve()), encoding="utf-8")
    (folder / "utils.py").write_text(UTILS, encoding="utf-8")
    return folder


def main(argv: list[str] | None = None) -> int:
    """`python -m silkie.dev.lmms_task FOLDER [--pictures N]`: write the task for `--include-path FOLDER`."""
    import argparse
    import logging

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="where to write the task (lmms-eval's --include_path)")
    parser.add_argument("--pictures", type=int, default=30, help="synthetic pictures (two questions each)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.pictures < 1:
        parser.error("--pictures must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    folder = write_shapes_task(args.folder, args.pictures, args.seed)
    logging.getLogger(__name__).info("task %s (%d questions) written to %s", TASK, 2 * args.pictures, folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
