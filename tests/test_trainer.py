"""DPO trainer end to end on the tiny model: learning needs the image, resume, NaN stop, adapter output."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from silkie.dpo.trainer import NonFiniteLossError
from silkie.train import latest_checkpoint, remove_staging

from .train_fixtures import (
    asset_overrides,
    constant_image_zip,
    make_assets,
    run_in_process,
    run_subprocess,
    subprocess_env,
    train_command,
)

FAST = ["training.eval_strategy=no", "data.eval_fraction=0.0", "training.logging_steps=1", "training.report_to=none"]


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"))


def read_metrics(working: Path) -> list[dict]:
    return [json.loads(line) for line in (working / "metrics.jsonl").read_text().splitlines()]


def test_images_drive_learning(assets, tmp_path):
    """Held-out reward accuracy rises clearly above chance with real images, not with a constant image."""
    common = [
        "training.max_steps=150",
        "training.eval_steps=150",
        "training.save_steps=1000",
        "data.eval_fraction=0.15",
        "training.report_to=none",
        "training.logging_steps=10",
        "training.learning_rate=1e-3",
        "training.lr_scheduler_type=constant",
        "training.warmup_ratio=0.0",
    ]
    real = run_in_process(tmp_path / "real", asset_overrides(assets) + common)
    flat_zip = constant_image_zip(assets["zip"], tmp_path / "flat.zip")
    flat = run_in_process(tmp_path / "flat", asset_overrides(assets, images=flat_zip) + common)
    assert real["step"] == flat["step"] == 150
    assert real["eval_rewards/accuracies"] > 0.66, real  # measured 0.758
    assert 0.35 < flat["eval_rewards/accuracies"] < 0.60, flat  # measured 0.484
    assert (tmp_path / "real" / "FINISHED").is_file() and (tmp_path / "real" / "training_curves.png").is_file()


def test_adapter_is_peft_loadable_and_changes_output(assets, tmp_path):
    working = tmp_path / "run"
    run_in_process(working, asset_overrides(assets) + FAST + ["training.max_steps=6", "training.learning_rate=5e-3"])
    from peft import PeftModel

    from silkie.models.qwen_vl import QWenLMHeadModel

    adapter = working / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert (adapter / "qwen.tiktoken").is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 32
    base = QWenLMHeadModel.from_pretrained(assets["model"]).eval()
    ids = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, adapter).eval()
        after = tuned(ids).logits
    assert (after - before).abs().max() > 1e-4
    records = read_metrics(working)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    for name in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "logits/chosen",
        "logits/rejected",
    ):
        assert name in train[-1]
    assert 0.0 <= train[-1]["rewards/accuracies"] <= 1.0


def test_kill_and_resume_continues_same_run(assets, tmp_path):
    overrides = (
        asset_overrides(assets) + FAST + ["training.max_steps=12", "training.save_steps=4", "data.max_prompts=80"]
    )
    straight = run_subprocess(tmp_path / "straight", overrides)
    assert straight.returncode == 0, straight.stderr[-2000:]

    working = tmp_path / "killed"
    proc = subprocess.Popen(
        train_command(working, overrides), env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    while latest_checkpoint(working) is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = latest_checkpoint(working)
    assert first is not None and not (working / "FINISHED").exists()
    resumed = run_subprocess(working, overrides)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {first.name}" in resumed.stdout
    state = json.loads((working / "checkpoint-12" / "trainer_state.json").read_text())
    assert state["global_step"] == 12
    assert json.loads((working / "checkpoint-12" / "silkie_run.json").read_text()) == {"world_size": 1}
    losses_straight = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "straight") if "loss" in r}
    losses_resumed = {r["step"]: r["loss"] for r in read_metrics(working) if "loss" in r}
    resume_step = int(first.name.split("-")[1])
    for step in range(resume_step + 1, 13):  # same data order, optimizer and scheduler state after the resume
        assert losses_resumed[step] == pytest.approx(losses_straight[step], abs=1e-4), step


def test_nan_loss_stops_with_the_step_and_saves_nothing(assets, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for item in Path(assets["model"]).iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    state = load_file(str(broken / "model.safetensors"))
    state["lm_head.weight"][3, 0] = float("nan")
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    overrides = [
        f"model.path={broken}",
        f"data.path={assets['jsonl']}",
        f"data.images={assets['zip']}",
        *FAST,
        "training.max_steps=4",
        "training.save_steps=1",
    ]
    with pytest.raises(NonFiniteLossError, match="at step 1"):
        run_in_process(tmp_path / "nan", overrides)
    assert latest_checkpoint(tmp_path / "nan") is None
    assert not (tmp_path / "nan" / "adapter").exists()


def test_half_written_checkpoints_are_ignored_and_removed(tmp_path):
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "tmp-checkpoint-8").mkdir()
    assert latest_checkpoint(tmp_path).name == "checkpoint-4"
    assert [p.name for p in remove_staging(tmp_path)] == ["tmp-checkpoint-8"]
    assert not (tmp_path / "tmp-checkpoint-8").exists()


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_on_two_cpu_processes(assets, tmp_path, stage):
    working = tmp_path / f"zero{stage}"
    overrides = (
        asset_overrides(assets)
        + FAST
        + [
            f"deepspeed.stage={stage}",
            "training.max_steps=8",
            "training.save_steps=100",
            "data.max_prompts=8",
            "training.per_device_train_batch_size=4",
            "training.learning_rate=5e-3",
            "training.lr_scheduler_type=constant",
            "training.warmup_ratio=0.0",
            "training.gradient_checkpointing=true",
        ]
    )
    command = [
        train_command(working, overrides)[0],
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        *train_command(working, overrides)[1:],
    ]
    env = subprocess_env()
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = [r["loss"] for r in read_metrics(working) if "loss" in r]
    assert len(losses) == 8
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.01, losses  # the loss goes down
    assert (working / "adapter" / "adapter_model.safetensors").is_file()
    assert (working / "FINISHED").is_file()


def test_precomputed_reference_matches_and_is_reused_or_rebuilt(assets, tmp_path, capsys):
    base = asset_overrides(assets) + FAST + ["training.save_steps=4", "data.max_prompts=40"]
    on_the_fly = tmp_path / "on-the-fly"
    run_in_process(on_the_fly, base + ["training.max_steps=4"])
    cached = tmp_path / "cached"
    run_in_process(cached, base + ["training.max_steps=4", "dpo.precompute_ref_log_probs=true"])
    assert "reference log-probs (train): computing" in capsys.readouterr().out
    table = torch.load(cached / "reference_logps" / "train.pt", weights_only=True)["logps"]
    assert table.shape[1] == 2 and torch.isfinite(table).all() and (table < 0).all()
    straight = {r["step"]: r["loss"] for r in read_metrics(on_the_fly) if "loss" in r}
    precomputed = {r["step"]: r["loss"] for r in read_metrics(cached) if "loss" in r}
    assert straight.keys() == precomputed.keys()
    for step in straight:  # same loss with the reference from the cache as from disabled adapters
        assert precomputed[step] == pytest.approx(straight[step], abs=1e-5)

    (cached / "FINISHED").unlink()
    run_in_process(cached, base + ["training.max_steps=6", "dpo.precompute_ref_log_probs=true"])
    out = capsys.readouterr().out
    assert "resuming from checkpoint-4" in out and "reference log-probs (train): reusing" in out

    (cached / "FINISHED").unlink()
    run_in_process(
        cached, [*base[:-1], "data.max_prompts=48", "training.max_steps=8", "dpo.precompute_ref_log_probs=true"]
    )
    assert "computing" in capsys.readouterr().out  # other data: the stale cache is rebuilt, not reused


def test_full_fine_tuning_uses_a_frozen_reference_copy(assets, tmp_path):
    working = tmp_path / "full"
    result = run_in_process(
        working,
        asset_overrides(assets)
        + FAST
        + ["lora.enabled=false", "training.max_steps=3", "training.learning_rate=1e-4", "data.max_prompts=24"],
    )
    assert result["step"] == 3
    from silkie.models.qwen_vl import QWenLMHeadModel

    tuned = QWenLMHeadModel.from_pretrained(working / "adapter")
    base = QWenLMHeadModel.from_pretrained(assets["model"])
    assert not torch.equal(tuned.transformer.h[0].attn.c_attn.weight, base.transformer.h[0].attn.c_attn.weight)
    assert torch.equal(tuned.transformer.visual.conv1.weight, base.transformer.visual.conv1.weight)  # tower frozen
    resampler_query = tuned.transformer.visual.attn_pool.query
    assert not torch.equal(resampler_query, base.transformer.visual.attn_pool.query)  # resampler trained
    losses = [r["loss"] for r in read_metrics(working) if "loss" in r]
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the start


def test_qlora_without_gpu_is_refused_with_a_clear_error(assets, tmp_path):
    from silkie.config import LoraSection, ModelSection
    from silkie.models.loading import build_policy

    with pytest.raises(ValueError, match="load_in_4bit: 4-bit QLoRA needs a CUDA GPU"):
        build_policy(ModelSection(path=str(assets["model"])), LoraSection(load_in_4bit=True))
    with pytest.raises(ValueError, match="needs lora.enabled: true"):
        build_policy(ModelSection(path=str(assets["model"])), LoraSection(enabled=False, load_in_4bit=True))


def test_rows_with_images_but_no_image_store_are_refused(assets):
    from silkie.config import DataSection
    from silkie.data.build import build_pairs

    with pytest.raises(ValueError, match=r"data.images is not set, but .*vlfeedback_80k.jsonl references images"):
        build_pairs(DataSection(path=str(assets["jsonl"])))


def test_full_fine_tuning_with_cached_reference_releases_the_copy(assets, tmp_path, capsys):
    common = (
        asset_overrides(assets)
        + FAST
        + ["lora.enabled=false", "training.max_steps=3", "training.learning_rate=1e-4", "data.max_prompts=24"]
    )
    run_in_process(tmp_path / "copy", common)
    run_in_process(tmp_path / "cached", common + ["dpo.precompute_ref_log_probs=true"])
    assert "released the frozen reference copy" in capsys.readouterr().out
    with_copy = [r["loss"] for r in read_metrics(tmp_path / "copy") if "loss" in r]
    with_cache = [r["loss"] for r in read_metrics(tmp_path / "cached") if "loss" in r]
    assert with_cache == pytest.approx(with_copy, abs=1e-5)  # frozen copy and cache give the same loss


def test_broken_images_are_left_out_with_workers_cached_reference_and_eval(assets, tmp_path):
    """A third of the pictures are corrupt: their pairs get weight 0 (blank picture) in every batch, even a batch
    of only broken pairs in a fresh DataLoader worker; the cached reference leaves them NaN; the run finishes."""
    import zipfile

    broken_zip = tmp_path / "broken.zip"
    with zipfile.ZipFile(assets["zip"]) as src, zipfile.ZipFile(broken_zip, "w") as dst:
        for i, name in enumerate(sorted(src.namelist())):
            dst.writestr(name, b"not a jpeg" if i % 3 == 0 else src.read(name))
    working = tmp_path / "run"
    overrides = asset_overrides(assets, images=broken_zip) + [
        "data.max_prompts=24",
        "data.eval_fraction=0.25",
        "training.per_device_train_batch_size=1",
        "training.per_device_eval_batch_size=1",
        "training.dataloader_num_workers=2",
        "dpo.precompute_ref_log_probs=true",
        "training.max_steps=8",
        "training.eval_strategy=steps",
        "training.eval_steps=8",
        "training.save_steps=100",
        "training.logging_steps=1",
        "training.report_to=none",
    ]
    with pytest.warns(UserWarning):
        result = run_in_process(working, overrides)
    assert result["step"] == 8 and 0.0 <= result["eval_rewards/accuracies"] <= 1.0
    losses = [r["loss"] for r in read_metrics(working) if "loss" in r]
    assert len(losses) == 8 and all(math.isfinite(loss) for loss in losses)
    assert 0.0 in losses  # a step whose one pair was broken contributes nothing
    for split in ("train", "eval"):
        table = torch.load(working / "reference_logps" / f"{split}.pt", weights_only=True)["logps"]
        unscored = int(torch.isnan(table[:, 0]).sum())
        assert 0 < unscored < len(table), (split, unscored, len(table))  # exactly the broken pairs stay NaN


@pytest.mark.parametrize("setup", ["lora_bf16_weights", "full_ft_fp32_weights"])
def test_bf16_autocast_without_deepspeed(assets, tmp_path, setup):
    """accelerate's autocast wrapper returns the forward's outputs in fp32 (the chunked head must cast them back),
    and a frozen reference copy must run under the same autocast as the policy: at step 1 policy = reference, so
    the rewards are exactly 0 and the loss is ln 2."""
    extra = ["model.dtype=bf16"] if setup == "lora_bf16_weights" else ["model.dtype=fp32", "lora.enabled=false"]
    working = tmp_path / setup
    overrides = asset_overrides(assets) + FAST + extra
    run_in_process(working, overrides + ["training.bf16=true", "training.max_steps=2", "data.max_prompts=16"])
    first = next(r for r in read_metrics(working) if "loss" in r)
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0, first
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_group_by_length_resume_in_a_later_epoch_on_two_ranks(assets, tmp_path):
    """On a resume the length sampler sits deeper than the Trainer's set_epoch reaches: without the trainer's own
    set_epoch, two ranks resumed in epoch 1 replayed epoch 0's order (the losses after the resume differed)."""
    import shutil

    overrides = (
        asset_overrides(assets)
        + FAST
        + [
            "data.max_prompts=6",
            "training.group_by_length=true",
            "training.per_device_train_batch_size=4",
            "training.max_steps=10",
            "training.save_steps=7",
        ]
    )
    command = [train_command(tmp_path, overrides)[0], "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2"]  # fmt: skip
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1"}

    def train(working: Path) -> None:
        done = subprocess.run(command + train_command(working, overrides)[1:], env=env, capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    straight = tmp_path / "straight"
    train(straight)
    state = json.loads((straight / "checkpoint-7" / "trainer_state.json").read_text())
    assert state["epoch"] > 1.0, state["epoch"]  # the resume point lies in the second epoch
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed, ignore=shutil.ignore_patterns("checkpoint-10", "adapter", "FINISHED"))
    train(resumed)
    first = {r["step"]: r["loss"] for r in read_metrics(straight) if "loss" in r}
    again = {r["step"]: r["loss"] for r in read_metrics(resumed) if "loss" in r}  # later lines win: the resume
    for step in (8, 9, 10):
        assert again[step] == pytest.approx(first[step], abs=1e-5), (step, first, again)


def test_a_checkpoint_is_not_resumed_with_another_number_of_processes(tmp_path):
    from silkie.dpo.trainer import ResumeError, check_resume_layout

    checkpoint = tmp_path / "checkpoint-40"
    checkpoint.mkdir()
    check_resume_layout(checkpoint, 16)  # written before the layout file existed: nothing to compare
    (checkpoint / "silkie_run.json").write_text(json.dumps({"world_size": 8}))
    check_resume_layout(checkpoint, 8)
    with pytest.raises(ResumeError, match=r"checkpoint-40 was saved by a run of 8 processes and this launch has 16"):
        check_resume_layout(checkpoint, 16)


def test_metric_means_weigh_pairs_and_answer_tokens_as_trl():
    """Rewards and eval_loss average over pairs (a weight-0 pair, whose image failed, left out); the mean logits over
    answer tokens, so a 40-token answer counts 40 times as much as a 1-token one (TRL's definition)."""
    from collections import defaultdict
    from types import SimpleNamespace

    from accelerate import Accelerator

    from silkie.dpo.trainer import SilkieDPOTrainer

    fake = SimpleNamespace(
        accelerator=Accelerator(cpu=True), _metrics={"train": defaultdict(list), "eval": defaultdict(list)}
    )
    metrics = {
        "rewards/chosen": torch.tensor([1.0, 3.0, 100.0]),
        "logits/chosen": torch.tensor([-1.0, 2.0, 100.0]),
        "weight": torch.tensor([1.0, 1.0, 0.0]),
        "weight:logits/chosen": torch.tensor([1.0, 40.0, 0.0]),  # pair weight x answer length
        "loss": torch.tensor([0.5, 0.7, 9.0]),
    }
    for mode in ("train", "eval"):
        SilkieDPOTrainer._store_metrics(fake, dict(metrics), mode)
    assert fake._metrics["train"]["rewards/chosen"] == [2.0]
    assert fake._metrics["train"]["logits/chosen"] == [pytest.approx((-1.0 + 40 * 2.0) / 41)]
    assert fake._metrics["eval"]["logits/chosen"] == [[pytest.approx(79.0), 41.0]]  # summed over the evaluation
    # eval_loss is the mean over the pairs that count; the train loss stays the Trainer's (optimized) one
    assert fake._metrics["eval"]["loss"] == [[pytest.approx(1.2), 2.0]]
    assert "loss" not in fake._metrics["train"]


def test_resume_at_the_last_step_finishes_without_another_step_or_evaluation(assets, tmp_path):
    """A crash after the last checkpoint (before FINISHED): the rerun trains no step 9 and reuses the evaluation
    at step 8; the best checkpoint (reduce_lr_on_plateau tracks one) is recorded under its final name."""
    working = tmp_path / "run"
    overrides = asset_overrides(assets) + [
        "data.max_prompts=24",
        "data.eval_fraction=0.25",
        "training.max_steps=8",
        "training.save_steps=4",
        "training.eval_steps=4",
        "training.save_total_limit=2",
        "training.lr_scheduler_type=reduce_lr_on_plateau",
        "training.logging_steps=1",
        "training.report_to=none",
    ]
    first = run_in_process(working, overrides)
    state = json.loads((working / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] in (str(working / "checkpoint-4"), str(working / "checkpoint-8"))
    assert [r["step"] for r in read_metrics(working) if "eval_loss" in r] == [4, 8]  # not evaluated twice at 8
    (working / "FINISHED").unlink()
    again = run_in_process(working, overrides)
    assert again["step"] == first["step"] == 8 and json.loads((working / "FINISHED").read_text())["step"] == 8
    assert again["eval_loss"] == pytest.approx(first["eval_loss"], abs=1e-6)
    assert not (working / "checkpoint-9").exists()


def test_a_signal_during_the_last_save_still_finishes_the_run(assets, tmp_path, monkeypatch):
    """Slurm's warning can land after the last step: every step is done, so the run finishes (adapter, FINISHED)
    instead of stopping as preempted (on several ranks, only the signalled one would have gone to teardown)."""
    import signal as signals

    from silkie.dpo.trainer import SilkieDPOTrainer

    original = SilkieDPOTrainer._save_checkpoint

    def save_then_signal(self, model, trial):
        original(self, model, trial)
        if self.state.global_step == self.state.max_steps:
            signals.raise_signal(signals.SIGUSR1)

    monkeypatch.setattr(SilkieDPOTrainer, "_save_checkpoint", save_then_signal)
    working = tmp_path / "run"
    result = run_in_process(working, asset_overrides(assets) + FAST + ["training.max_steps=3", "data.max_prompts=8"])
    assert result["step"] == 3 and "preempted" not in result
    assert (working / "FINISHED").is_file() and (working / "adapter" / "adapter_model.safetensors").is_file()


def test_an_extended_run_trains_its_first_new_step_on_the_new_schedule(assets, tmp_path):
    """Finished at step 3 of a cosine schedule (learning rate 0), then extended to 5 steps (what --force does when
    only max_steps changed): step 4 must use the new schedule's rate; the optimizer state held the old schedule's 0,
    which left the weights of step 4 unchanged."""
    from safetensors.torch import load_file

    working = tmp_path / "run"
    overrides = asset_overrides(assets) + FAST + ["data.max_prompts=16", "training.save_steps=1"]
    run_in_process(working, overrides + ["training.max_steps=3", "training.save_total_limit=null"])
    for name in ("FINISHED", "config.yaml", "final_metrics.json", "training_curves.png"):  # what --force moves
        (working / name).unlink()
    shutil.rmtree(working / "adapter")
    run_in_process(working, overrides + ["training.max_steps=5", "training.save_total_limit=null"])
    before, after = (load_file(working / f"checkpoint-{n}" / "adapter_model.safetensors") for n in (3, 4))
    changed = sum(not torch.equal(before[name], after[name]) for name in before)
    assert changed == len(before)  # every adapter tensor moved at step 4
