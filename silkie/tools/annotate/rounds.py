"""`silkie annotate rounds`: on-policy iterations (RLAIF-V / OPA-DPO style). Round r: the current policy samples
`policy_answers` answers per instruction (beside k drawn from the pool), the judge rates them, pairs follow, and DPO
trains through the launcher (local torchrun, or Slurm with `launch_args`) starting from the current policy, which
is also the round's reference. The round's LoRA adapter is then merged into it: the next round's policy. Each
round has its own folder (`round-r/data`, `round-r/run`, `round-r/merged`) and the whole loop resumes."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from silkie.config.annotate import PoolConfig, PoolModel, RoundsConfig, load_judge, load_pool
from silkie.run_dir import ADAPTER_DIR, FINAL_METRICS_NAME, FINISHED_NAME
from silkie.tools.annotate.files import USAGE
from silkie.tools.cli import ToolError, read_config

log = logging.getLogger(__name__)
SUMMARY = "rounds.json"


def round_recipe(config: RoundsConfig, policy: Path, release: Path, target: Path) -> Path:
    """The round's recipe: the configured one with this round's policy and release, its held-out prompts split by
    `data.eval_split: hashed` (a prompt's side is the same in every round) unless the recipe chooses; written to
    `target`."""
    from silkie.config import load_recipe, save_recipe

    overrides = [
        *config.overrides,
        f"model.path={policy}",
        "data.source=vlfeedback",
        f"data.path={release / 'vlfeedback_80k.jsonl'}",
        f"data.images={release / 'merged_images.zip'}",
    ]
    recipe = read_config(load_recipe, config.recipe, overrides)
    if recipe.data.eval_fraction and _hashed_split(config, target):  # a prompt is held out in every round or none
        recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, eval_split="hashed"))
    save_recipe(recipe, target)
    return target


def _hashed_split(config: RoundsConfig, target: Path) -> bool:
    """Whether a round splits with `data.eval_split: hashed`: unless the recipe or the overrides choose the split,
    or the round was started with another one (its resume must see the same data)."""
    from silkie.config import load_recipe
    from silkie.config.recipe import read_recipe_file

    raw, _ = read_config(read_recipe_file, config.recipe)
    chosen = "eval_split" in (raw.get("data") or {}) or any(o.startswith("data.eval_split=") for o in config.overrides)
    started = target.is_file() and load_recipe(target).data.eval_split != "hashed"
    return not chosen and not started


def policy_models(
    config: RoundsConfig, policy: Path, number: int, template_kwargs: dict | None = None
) -> list[PoolModel]:
    """The policy as `policy_answers` pool entries (one name and seed each), prompted with the recipe's chat template
    variables (`template_kwargs`: the pairs it trains on are rendered with them)."""
    return [
        PoolModel(
            str(policy), f"policy-r{number}-s{i}", None, config.policy_max_new_tokens, config.policy_temperature, 0.9,
            chat_template_kwargs=template_kwargs,
        )  # fmt: skip
        for i in range(1, config.policy_answers + 1)
    ]


def judge_usage(data: Path) -> dict[str, float] | None:
    """The round's judge requests, tokens and cost (priced by the judge file), as `judge` recorded them."""
    path = data / USAGE
    return json.loads(path.read_text()) if path.is_file() else None


def train_round(recipe: Path, working: Path, launch_args: list[str]) -> dict[str, Any]:
    """DPO through the launcher (resumes a cut-short run); the run's final metrics."""
    if not (working / FINISHED_NAME).is_file():
        command = [sys.executable, "-m", "silkie", "launch", "--config", str(recipe), "--working", str(working)]
        done = subprocess.run([*command, *launch_args], stdout=sys.stderr)  # stdout stays the summary's
        if done.returncode != 0 or not (working / FINISHED_NAME).is_file():
            raise ToolError(f"round training failed (exit {done.returncode}): rerun to resume; its run is {working}")
    return json.loads((working / FINAL_METRICS_NAME).read_text())


def next_policy(policy: Path, run: Path, merged: Path) -> Path:
    """The policy after the round: its adapter merged into the round's policy (a full fine-tuning run's
    checkpoint as it is)."""
    adapter = run / ADAPTER_DIR
    if not (adapter / "adapter_config.json").is_file():
        return adapter
    if not (merged / "config.json").is_file():
        import torch

        from silkie.tools.merge import merge_adapter

        dtype = torch.float32 if not torch.cuda.is_available() else torch.bfloat16
        merge_adapter(policy, adapter, merged, dtype=dtype, overwrite=True)
    return merged


def policy_rating(data: Path, names: list[str]) -> float | None:
    """The mean rating (over the aspects) of the policy's answers in a round's release."""
    from silkie.tools.annotate.files import read_jsonl

    scores = [
        sum(int(a["Rating"]) for a in completion["annotations"].values()) / len(completion["annotations"])
        for row in read_jsonl(data / "release" / "vlfeedback_80k.jsonl")
        for completion in row["completions"]
        if completion["model"] in names
    ]
    return sum(scores) / len(scores) if scores else None


def run_rounds(config: RoundsConfig, working: Path, progress: bool = True) -> list[dict[str, Any]]:
    """All rounds (done ones skipped); returns one summary per round, also written to `working/rounds.json`."""
    from silkie.config import load_recipe
    from silkie.tools.annotate.files import import_instructions
    from silkie.tools.annotate.judge import judge_answers
    from silkie.tools.annotate.judges import make_judge
    from silkie.tools.annotate.release import write_release
    from silkie.tools.annotate.sample import sample_answers

    judge = read_config(load_judge, config.judge)
    pool = read_config(load_pool, config.pool) if config.pool else PoolConfig(models=[], answers_per_instruction=0)
    call = None
    first = load_recipe(config.recipe, list(config.overrides)).model
    if first.ref_model:
        raise ToolError(f"annotate rounds: the recipe sets model.ref_model = {first.ref_model}, but each round's "
                        "reference is the policy it starts from; leave model.ref_model out")  # fmt: skip
    policy = Path(first.path)
    policy = policy.resolve() if policy.exists() else policy  # absolute: a Slurm job may start elsewhere
    working = working.resolve()
    summaries = []
    for number in range(1, config.rounds + 1):
        folder = working / f"round-{number}"
        data, run = folder / "data", folder / "run"
        policies = policy_models(config, policy, number, first.chat_template_kwargs)
        names = [model.label for model in policies]
        if not (run / FINISHED_NAME).is_file():
            data.mkdir(parents=True, exist_ok=True)
            instructions = import_instructions(Path(config.instructions), Path(config.images), data, config.limit)
            round_pool = PoolConfig([*policies, *pool.models], pool.answers_per_instruction, pool.seed + number,
                                    pool.device)  # fmt: skip
            sample_answers(round_pool, instructions, data, progress, always=names)
            call = call or make_judge(judge)
            judge_answers(judge, call, instructions, data, progress=progress)
            write_release(instructions, data)
            if judge.kind == "local":  # its memory goes back before the round trains on the same GPUs
                call = None
            _release_memory()
        recipe = round_recipe(config, policy, data / "release", folder / "recipe.yaml")
        final = train_round(recipe, run, list(config.launch_args))
        summary = json.loads((data / "summary.json").read_text())
        summaries.append(
            {
                "round": number,
                "policy": str(policy),
                "policy_mean_rating": policy_rating(data, names),
                "rated_instructions": summary["rated_instructions"],
                "judge_failures": summary["judge_failures"],
                "judge_usage": judge_usage(data),
                "eval_rewards/accuracies": final.get("eval_rewards/accuracies"),
                "run": str(run),
            }
        )
        log.info("round %d: policy mean rating %s, held-out accuracy %s", number,
                 summaries[-1]["policy_mean_rating"], summaries[-1]["eval_rewards/accuracies"])  # fmt: skip
        policy = next_policy(policy, run, folder / "merged")
        (working / SUMMARY).write_text(json.dumps(summaries, indent=2) + "\n")
    return summaries


def _release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
