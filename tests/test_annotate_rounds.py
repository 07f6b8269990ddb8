"""`silkie annotate rounds`: each round's policy answers, the judge rates, DPO trains through the launcher from that
policy, and the merged adapter is the next round's policy; a rerun redoes nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from .conftest import REPO_ROOT
from .train_fixtures import subprocess_env


@pytest.fixture(scope="module")
def rounds(tmp_path_factory):
    from silkie.dev.synthetic import write_synthetic_vlfeedback
    from silkie.dev.tiny_qwen_vl import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("rounds")
    model = build_tiny_checkpoint(root / "tiny-qwen-vl")
    write_synthetic_vlfeedback(root / "vlf", n=24, seed=0)
    overrides = ["training.max_steps=3", "data.eval_fraction=0.25", "data.min_margin=0", "training.report_to=none",
                 f"model.path={model}"]  # fmt: skip
    config = root / "rounds.yaml"
    config.write_text(
        f"rounds: 2\nrecipe: {REPO_ROOT / 'dpo_config' / 'demo.yaml'}\noverrides: {json.dumps(overrides)}\n"
        f"instructions: {root / 'vlf' / 'vlfeedback_80k.jsonl'}\nimages: {root / 'vlf' / 'merged_images.zip'}\n"
        f"judge: {REPO_ROOT / 'dpo_config' / 'annotate' / 'judge_demo.yaml'}\npolicy_answers: 2\n"
        "policy_max_new_tokens: 10\n"
    )
    command = [sys.executable, "-m", "silkie", "annotate", "rounds", "--config", str(config), "--working",
               str(root / "work"), "--no-progress"]  # fmt: skip
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return root, model, command, json.loads(done.stdout)


def test_each_round_samples_from_the_policy_the_last_one_trained(rounds):
    root, model, _, summaries = rounds
    work = root / "work"
    assert [s["round"] for s in summaries] == [1, 2]
    assert summaries[0]["policy"] == str(model) and summaries[1]["policy"] == str(work / "round-1" / "merged")
    for number in (1, 2):
        answers = [json.loads(line) for line in (work / f"round-{number}" / "data" / "answers.jsonl").open()]
        assert {a["model"] for a in answers} == {f"policy-r{number}-s1", f"policy-r{number}-s2"}
        # an instruction with an empty answer (the tiny policy can stop at once) is not sent to the judge
        with_an_empty = {a["id"] for a in answers if not a["response"].strip()}
        assert len(answers) == 48 and summaries[number - 1]["rated_instructions"] == 24 - len(with_an_empty)
        recipe = (work / f"round-{number}" / "recipe.yaml").read_text()
        assert f"path: {summaries[number - 1]['policy']}" in recipe and "source: vlfeedback" in recipe
        assert "eval_split: hashed" in recipe  # a prompt held out in round 1 is held out in round 2
        assert 0 <= summaries[number - 1]["eval_rewards/accuracies"] <= 1
        assert 1 <= summaries[number - 1]["policy_mean_rating"] <= 5
        usage = summaries[number - 1]["judge_usage"]  # the round's judge requests: one per rated instruction here
        assert usage == json.loads((work / f"round-{number}" / "data" / "judge_usage.json").read_text())
        assert usage["requests"] >= summaries[number - 1]["rated_instructions"] > 0
    # round 2's policy is round 1's base with round 1's adapter folded in
    merged = load_file(next((work / "round-1" / "merged").glob("*.safetensors")))
    base = load_file(next(model.glob("*.safetensors")))
    changed = [name for name in base if not torch.equal(base[name], merged[name])]
    assert changed and all(any(t in name for t in ("c_attn", "c_proj", "w1", "w2")) for name in changed)
    assert json.loads((work / "rounds.json").read_text()) == summaries


def test_a_rerun_redoes_nothing(rounds):
    root, _, command, summaries = rounds
    work = root / "work"
    files = [work / "round-2" / "data" / "answers.jsonl", work / "round-2" / "run" / "metrics.jsonl"]
    before = [path.read_bytes() for path in files]
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == summaries and [path.read_bytes() for path in files] == before


def test_a_reference_of_its_own_is_refused_before_any_round(rounds, tmp_path):
    root, model, command, _ = rounds
    config = root / "rounds.yaml"
    told = tmp_path / "rounds.yaml"
    told.write_text(config.read_text().replace('"training.max_steps=3"', f'"model.ref_model={model}"'))
    args = [*command[:command.index("--config") + 1], str(told), "--working", str(tmp_path / "work"), "--no-progress"]
    done = subprocess.run(args, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and not (tmp_path / "work" / "round-1").exists()
    assert "each round's reference is the policy it starts from" in done.stderr.strip().splitlines()[-1]


def test_a_round_splits_by_hash_unless_the_recipe_chose_or_the_round_began_otherwise(tmp_path):
    from silkie.config import load_recipe, save_recipe
    from silkie.config.annotate import RoundsConfig
    from silkie.tools.annotate.rounds import round_recipe

    demo = REPO_ROOT / "dpo_config" / "demo.yaml"  # eval_fraction 0.1
    release = tmp_path / "release"

    def split(overrides: list[str], target) -> str:
        config = RoundsConfig(recipe=str(demo), overrides=overrides, instructions="i", images="m", judge="j")
        return load_recipe(round_recipe(config, tmp_path / "policy", release, target)).data.eval_split

    assert split([], tmp_path / "new.yaml") == "hashed"
    assert split(["data.eval_split=ranked"], tmp_path / "chosen.yaml") == "ranked"
    assert split(["data.eval_fraction=0", "data.eval_size=3"], tmp_path / "by-count.yaml") == "ranked"
    save_recipe(load_recipe(demo), tmp_path / "begun.yaml")  # a round cut short under the earlier rule
    assert split([], tmp_path / "begun.yaml") == "ranked"
