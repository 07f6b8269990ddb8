"""DPO trainer end to end on the tiny model: learning needs the image, resume, NaN stop, adapter output."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from silkie.train import latest_checkpoint
from silkie.train.trainer import NonFiniteLossError, ResumeError

from .train_fixtures import (
    FAST,
    asset_overrides,
    constant_image_zip,
    read_metrics,
    run_in_process,
    subprocess_env,
    train_command,
)


def test_images_drive_learning(assets, tmp_path):
    """Held-out reward accuracy rises clearly above chance with real images, not with a constant image."""
    common = [
        "training.max_steps=70",
        "training.eval_steps=70",
        "training.save_steps=1000",
        "data.eval_fraction=0.15",
        "training.report_to=none",
        "training.logging_steps=10",
        "training.learning_rate=2e-3",
        "training.lr_scheduler_type=constant",
        "training.warmup_ratio=0.0",
    ]
    real = run_in_process(tmp_path / "real", asset_overrides(assets) + common)
    flat_zip = constant_image_zip(assets["zip"], tmp_path / "flat.zip")
    flat = run_in_process(tmp_path / "flat", asset_overrides(assets, images=flat_zip) + common)
    assert real["step"] == flat["step"] == 70
    assert real["eval_rewards/accuracies"] > 0.64, real  # measured 0.708
    assert 0.35 < flat["eval_rewards/accuracies"] < 0.58, flat  # measured 0.481
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
    other_data = [*base[:-1], "data.max_prompts=48", "training.max_steps=8", "dpo.precompute_ref_log_probs=true"]
    with pytest.raises(ResumeError, match="checkpoint-6 was trained on other data"):
        run_in_process(cached, other_data)  # its checkpoints no longer fit
    for checkpoint in cached.glob("checkpoint-*"):  # as --force moves them aside (the reference cache stays)
        shutil.rmtree(checkpoint)
    run_in_process(cached, other_data)
    assert "computing" in capsys.readouterr().out  # other data: the stale cache is rebuilt, not reused


def test_ld_dpo_and_wpo_train_with_on_the_fly_or_cached_reference(assets, tmp_path, capsys):
    """`dpo.ld_alpha` weights the reference's tokens too (its cache differs from plain DPO's), and both variants
    give the same losses with the reference cached as computed on the fly."""
    base = asset_overrides(assets) + FAST + ["data.max_prompts=24", "training.max_steps=3", "training.save_steps=3"]
    variants = ["dpo.ld_alpha=0.3", "dpo.use_weighting=true", "lora.dropout=0.1"]  # dropout stays off (default)
    run_in_process(tmp_path / "plain", base + ["dpo.precompute_ref_log_probs=true"])
    run_in_process(tmp_path / "fly", base + variants)
    note = "dropout is off (dpo.disable_dropout, TRL's default): lora.dropout 0.1 is not applied"
    assert note in capsys.readouterr().out
    # the bar shows off a terminal too when the recipe asks for it (the default there is plain lines only)
    cached = ["dpo.precompute_ref_log_probs=true", "dpo.precompute_ref_batch_size=5", "training.disable_tqdm=false"]
    run_in_process(tmp_path / "cached", base + variants + cached)
    tables = [torch.load(tmp_path / run / "reference_logps" / "train.pt")["logps"] for run in ("plain", "cached")]
    plain, weighted = tables
    batches = -(-len(weighted) // 5)  # the precompute's own batch size, with a progress bar
    bar = [line for line in capsys.readouterr().err.split("\r") if line.startswith("reference log-probs (train)")]
    assert bar and "100%" in bar[-1] and f" {batches}/{batches} " in bar[-1], bar[-1:]
    assert (weighted <= 0).all() and (weighted >= plain - 1e-4).all()  # alpha < 1 shrinks the verbose tails
    assert ((weighted - plain).abs() < 1e-4).any(dim=1).all()  # each pair's shorter answer counts in full
    assert (weighted > plain + 1e-3).any(dim=1).float().mean() > 0.3  # the pairs whose answers differ in length
    runs = ("plain", "fly", "cached")
    losses = {run: [r["loss"] for r in read_metrics(tmp_path / run) if "loss" in r] for run in runs}
    assert len(losses["fly"]) == 3 and losses["cached"] == pytest.approx(losses["fly"], abs=1e-5)
    # step 1: policy = reference, so plain DPO's loss is log 2 and WPO's is log 2 times the mean pair weight
    assert losses["plain"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(losses["fly"][0] - math.log(2)) > 1e-4


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


def test_disable_dropout_makes_the_policy_deterministic_in_training_mode(assets):
    """`dpo.disable_dropout` (TRL's default): LoRA adapters get no dropout whatever `lora.dropout` says, so two
    training-mode forwards agree; without it `lora.dropout` applies."""
    from silkie.config import LoraSection, ModelSection
    from silkie.models.loading import build_policy

    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    for disable, same in ((True, True), (False, False)):
        model = build_policy(ModelSection(path=str(assets["model"])), LoraSection(r=4, dropout=0.5), disable).train()
        dropouts = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
        assert (max(dropouts, default=0.0) == 0.0) is disable and (0.5 in dropouts) is not disable
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.5)
            first, second = (model(input_ids=ids).logits for _ in range(2))
        assert torch.equal(first, second) is same


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


def test_broken_images_are_left_out_with_workers_cached_reference_and_eval(assets, tmp_path, capsys):
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
    assert result["pairs_left_out"] == losses.count(0.0)  # counted over the run, and said at its end
    assert f"| {losses.count(0.0)} pairs left out (a picture or video failed to load)" in capsys.readouterr().out
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


def test_metric_means_weigh_pairs_and_answer_tokens_as_trl():
    """Rewards and eval_loss average over pairs (a weight-0 pair, whose image failed, left out); the mean logits over
    answer tokens, so a 40-token answer counts 40 times as much as a 1-token one (TRL's definition). A training
    micro-batch reduces its finite check, token count and metric sums in one all-reduce."""
    from collections import defaultdict
    from types import SimpleNamespace

    from accelerate import Accelerator

    from silkie.train.trainer import NonFiniteLossError, SilkieDPOTrainer

    trainer = SilkieDPOTrainer.__new__(SilkieDPOTrainer)  # the metric methods alone, without a model
    accelerator, reduces = Accelerator(cpu=True), []

    def reduce(tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        reduces.append(tensor)
        return accelerator.reduce(tensor, reduction)

    trainer.accelerator = SimpleNamespace(gather_for_metrics=accelerator.gather_for_metrics, reduce=reduce)
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._pairs_left_out = 0
    trainer.state = SimpleNamespace(num_input_tokens_seen=5, global_step=0)
    trainer.args = SimpleNamespace(output_dir="run")
    metrics = {
        "rewards/chosen": torch.tensor([1.0, 3.0, 100.0]),
        "logits/chosen": torch.tensor([-1.0, 2.0, 100.0]),
        "weight": torch.tensor([1.0, 1.0, 0.0]),
        "weight:logits/chosen": torch.tensor([1.0, 40.0, 0.0]),  # pair weight x answer length
        "loss": torch.tensor([0.5, 0.7, 9.0]),
    }
    masks = {f"{name}_attention_mask": torch.ones(3, length) for name, length in
             (("prompt", 4), ("chosen", 2), ("rejected", 3))}  # fmt: skip
    batch = {**masks, "pair_weight": metrics["weight"]}
    trainer._reduce_train_step(torch.tensor(0.6), dict(metrics), batch)
    trainer._store_eval_metrics(dict(metrics))
    assert len(reduces) == 1 and trainer.state.num_input_tokens_seen == 5 + 3 * (2 * 4 + 2 + 3)
    assert trainer._pairs_left_out == 1  # the weight-0 pair, counted in the same reduce
    assert trainer._metrics["train"]["rewards/chosen"] == [2.0]
    assert trainer._metrics["train"]["logits/chosen"] == [pytest.approx((-1.0 + 40 * 2.0) / 41)]
    assert trainer._metrics["eval"]["logits/chosen"] == [[pytest.approx(79.0), 41.0]]  # summed over the evaluation
    # eval_loss is the mean over the pairs that count; the train loss stays the Trainer's (optimized) one
    assert trainer._metrics["eval"]["loss"] == [[pytest.approx(1.2), 2.0]]
    assert "loss" not in trainer._metrics["train"]
    with pytest.raises(NonFiniteLossError, match="non-finite DPO loss at step 1 .value nan"):
        trainer._reduce_train_step(torch.tensor(float("nan")), dict(metrics), batch)
    assert len(reduces) == 2 and trainer._metrics["train"]["rewards/chosen"] == [2.0]  # nothing stored
    with pytest.raises(NonFiniteLossError, match=r"at step 1 \(on another rank; this rank's is 0.6\)"):
        trainer._raise_non_finite(torch.tensor(0.6))  # what a rank whose own loss is finite says


def test_every_n_layers_recomputes_only_those_blocks_and_trains_the_same(assets, tmp_path):
    from silkie.config import load_recipe
    from silkie.train.build import build_trainer

    from .train_fixtures import DEMO_RECIPE

    def two_steps(options: str) -> tuple[list[bool], list[int], float]:
        overrides = [*asset_overrides(assets), *FAST, "training.max_steps=2", "training.warmup_ratio=0",
                     "training.gradient_checkpointing=true", f"training.gradient_checkpointing_kwargs={options}",
                     "dpo.precompute_ref_log_probs=false"]  # fmt: skip
        built = build_trainer(load_recipe(DEMO_RECIPE, overrides), tmp_path / options, bookkeeping=False)
        blocks = built.trainer.model.get_base_model().transformer.h
        calls = [0] * len(blocks)
        for index, block in enumerate(blocks):  # a block's own hooks stay outside the checkpoint; its parts' do not
            block.mlp.register_forward_pre_hook(lambda *_, i=index: calls.__setitem__(i, calls[i] + 1))
        torch.manual_seed(0)
        loss = built.trainer.train().training_loss
        return [block.gradient_checkpointing for block in blocks], calls, loss

    flags, calls, loss = two_steps("{every_n_layers: 2}")
    assert flags == [True, False]
    # the policy pass runs the checkpointed block again in its backward; the reference pass (no grad) does not
    assert calls == [2 * 2 + 2, 2 * 1 + 2]  # 2 steps: (policy + its recompute) + reference; policy + reference
    all_flags, all_calls, all_loss = two_steps("{}")
    assert all_flags == [True, True] and all_calls == [6, 6]
    assert loss == pytest.approx(all_loss, abs=1e-6) and abs(loss - math.log(2)) > 1e-4  # step 2 learned


def test_a_compiling_run_watches_dynamo_and_an_eager_run_does_not(assets, tmp_path):
    from silkie.config import load_recipe
    from silkie.train.build import build_trainer
    from silkie.train.console import CompileWatchCallback

    from .train_fixtures import DEMO_RECIPE

    def watchers(compile_blocks: bool) -> list:
        overrides = [*asset_overrides(assets), *FAST, "training.max_steps=1", f"model.compile_blocks={compile_blocks}"]
        built = build_trainer(load_recipe(DEMO_RECIPE, overrides), tmp_path / str(compile_blocks), bookkeeping=True)
        callbacks = built.trainer.callback_handler.callbacks
        return [c for c in callbacks if isinstance(c, CompileWatchCallback)]

    assert len(watchers(True)) == 1 and watchers(False) == []
    torch._dynamo.reset()
