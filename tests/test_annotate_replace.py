"""`silkie annotate sample` replaces a drawn pool model that cannot take an instruction with the next pool model in a
seeded order, so the instruction keeps k answers; an instruction every drawn model failed is not retried."""

from __future__ import annotations

import json

from silkie.tools.annotate.cli import main

from .test_annotate import assets, records  # noqa: F401  (the tiny pool, instructions and images)


def test_a_model_that_cannot_take_an_instruction_is_replaced_by_another_of_the_pool(assets, tmp_path, monkeypatch):  # noqa: F811
    """Three pool models, two answers per instruction: where a drawn model fails an instruction, the third answers
    it instead (a seeded draw); a rerun keeps the same answers and redoes nothing."""
    import silkie.tools.annotate.sample as sample
    from silkie.tools.annotate.sample import assign_models, replaced_plan

    pool = tmp_path / "pool.yaml"
    pool.write_text((assets / "pool.yaml").read_text().replace(
        "answers_per_instruction: 2\n",
        f"  - {{path: {assets / 'qwen-vl'}, name: second-qwen-vl, max_new_tokens: 8}}\nanswers_per_instruction: 2\n",
    ))  # fmt: skip
    instructions = [json.loads(line) for line in (assets / "instructions.jsonl").read_text().splitlines()]
    names = ["qwen-vl", "qwen2-vl", "second-qwen-vl"]
    from types import SimpleNamespace

    rows = [SimpleNamespace(id=row["id"], prompt=row["prompt"]) for row in instructions]
    plan = assign_models(rows, names, 2, 0)
    victim = next(row_id for row_id, models in plan.items() if "qwen-vl" in models)
    real = sample.make_responder

    def failing_for_one(model, device, out):
        responder = real(model, device, out)
        inputs = responder.inputs

        def checked(image, question):
            if model.label == "qwen-vl" and question == next(r.prompt for r in rows if r.id == victim):
                raise ValueError("too long for this model")
            return inputs(image, question)

        responder.inputs = checked
        return responder

    monkeypatch.setattr(sample, "make_responder", failing_for_one)
    argv = ["sample", "--pool", str(pool), "--instructions", str(assets / "instructions.jsonl"), "--images",
            str(assets / "vlf" / "merged_images.zip"), "--out", str(tmp_path / "out"), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    answers = records(tmp_path / "out" / "answers.jsonl")
    by_id = {row.id: sorted(a["model"] for a in answers if a["id"] == row.id) for row in rows}
    assert all(len(models) == 2 for models in by_id.values())  # every instruction still has two answers
    replacement = (set(names) - set(plan[victim])).pop()
    assert by_id[victim] == sorted([*(set(plan[victim]) - {"qwen-vl"}), replacement])
    assert records(tmp_path / "out" / "answer_failures.jsonl") == [
        {"id": victim, "model": "qwen-vl", "reason": "too long for this model"}
    ]
    assert replaced_plan(plan, names, {(victim, "qwen-vl")}, 0)[victim] == sorted(
        [*plan[victim], replacement], key=names.index
    )
    before = (tmp_path / "out" / "answers.jsonl").read_text()
    assert main(argv) == 0 and (tmp_path / "out" / "answers.jsonl").read_text() == before  # nothing redone


def test_replacements_walk_a_seeded_order_skip_the_always_models_and_spare_a_faulty_instruction():
    from silkie.tools.annotate.sample import replaced_plan

    names = ["policy", "a", "b", "c", "d", "e"]
    plan = {"x": ["policy", "a", "b"], "y": ["policy", "c", "d"]}
    assert replaced_plan(plan, names, set(), 0, always=["policy"]) == plan  # no failure, no change
    one = replaced_plan(plan, names, {("x", "a")}, 0, always=["policy"])
    assert one["y"] == plan["y"] and len(one["x"]) == 4 and one["x"][:3] == ["policy", "a", "b"]
    first = one["x"][3]
    assert first in {"c", "d", "e"}
    chain = replaced_plan(plan, names, {("x", "a"), ("x", first)}, 0, always=["policy"])["x"]
    assert len(chain) == 5 and first in chain  # the replacement failed too: the next one in the same order
    assert set(chain) - {"policy", "a", "b", first} <= {"c", "d", "e"}
    assert replaced_plan(plan, names, {("x", "a")}, 0, always=["policy"]) == one  # the same failures, the same plan
    others = [replaced_plan(plan, names, {("x", "a")}, seed, always=["policy"])["x"][3] for seed in range(12)]
    assert len(set(others)) > 1  # the order is seeded
    exhausted = {("x", n) for n in ("a", "c", "d", "e")}
    assert sorted(replaced_plan(plan, names, exhausted, 0, always=["policy"])["x"]) == sorted(names)
    faulty = {("y", "c"), ("y", "d"), ("y", "policy")}  # every model failed: the instruction, not the models
    assert replaced_plan(plan, names, faulty, 0, always=["policy"])["y"] == plan["y"]

