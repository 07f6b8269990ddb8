"""Recipe -> TrainingArguments / DeepSpeed config translation."""

from __future__ import annotations

import pytest

from silkie.config import RecipeError, recipe_from_dict
from silkie.config.training import accumulation_steps
from silkie.train.arguments import deepspeed_config, training_arguments


def recipe(**sections):
    return recipe_from_dict({"model": {"path": "m"}, "data": {"path": "d"}, **sections})


def test_user_names_are_translated(tmp_path):
    args = training_arguments(
        recipe(
            training={
                "warmup_ratio": 0.1,
                "gradient_checkpointing": True,
                "group_by_length": True,
                "learning_rate": "1e-5",
                "report_to": "none",
            }
        ),
        tmp_path,
        bf16=False,
    )
    assert args.warmup_steps == 0.1
    assert args.activation_checkpointing is True
    assert args.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert args.train_sampling_strategy == "group_by_length"
    assert args.learning_rate == 1e-5
    assert args.remove_unused_columns is False
    assert args.eval_strategy == "no"  # no held-out split in this recipe


def test_global_batch_size_sets_the_accumulation_from_the_world_size(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    training = {"global_batch_size": 256, "per_device_train_batch_size": 2}
    assert [accumulation_steps(training, world) for world in (1, 8, 16)] == [128, 16, 8]
    fits = r"global_batch_size = 256 is not a multiple of .* = 48; set it to e.g. 240 or 288"
    with pytest.raises(RecipeError, match=fits):
        accumulation_steps(training, 24)  # 256 / (2 x 24) is not whole: the error names the fitting sizes
    # one process here (no WORLD_SIZE): the TrainingArguments get the whole global batch as accumulation
    args = training_arguments(recipe(training={**training, "report_to": "none"}), tmp_path, bf16=False)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 128)


def test_deepspeed_sections():
    assert deepspeed_config(recipe().deepspeed) is None
    zero3 = deepspeed_config(recipe(deepspeed={"stage": 3, "offload": True}).deepspeed)
    assert zero3["zero_optimization"]["stage"] == 3
    assert zero3["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert zero3["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert zero3["bf16"] == {"enabled": "auto"} and zero3["train_batch_size"] == "auto"


def test_length_grouped_order_depends_only_on_seed_and_epoch():
    import torch

    from silkie.train.trainer import EpochSeededLengthSampler

    lengths = [int(n) for n in torch.randint(10, 500, (200,), generator=torch.Generator().manual_seed(0))]
    first = EpochSeededLengthSampler(8, lengths=lengths, seed=42)
    torch.manual_seed(123)  # the global RNG state (restored late on resume) must not matter
    second = EpochSeededLengthSampler(8, lengths=lengths, seed=42)
    first.set_epoch(2)
    torch.manual_seed(7)
    second.set_epoch(2)
    order = list(first)
    assert order == list(second) and sorted(order) == list(range(200))
    second.set_epoch(3)
    assert list(second) != order
    batch = order[8:16]  # batches hold similar lengths: the spread inside one is far below the overall spread
    assert max(lengths[i] for i in batch) - min(lengths[i] for i in batch) < 200


def test_launch_cpu_trains_on_the_cpu_even_where_cuda_is_visible(tmp_path, monkeypatch):
    """Slurm hands a CPU-mode job step its GPUs anyway: launch.cpu must win over what CUDA reports."""
    import silkie.train.arguments as train_args

    monkeypatch.setattr(train_args.torch.cuda, "is_available", lambda: True)
    on_cpu = training_arguments(recipe(launch={"cpu": True}, training={"report_to": "none"}), tmp_path, bf16=False)
    assert on_cpu.use_cpu is True and on_cpu.device.type == "cpu"


def test_tf32_is_dropped_with_a_warning_where_no_ampere_gpu_trains(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU run, also on a GPU machine
    args = training_arguments(recipe(training={"tf32": True, "report_to": "none"}), tmp_path, bf16=False)
    assert args.use_cpu and args.tf32 is None  # transformers would raise "--tf32 requires Ampere"
    assert "training.tf32 is ignored" in capsys.readouterr().out


def test_a_learning_rate_left_out_is_said_with_the_defaults_a_trl_user_knows(tmp_path):
    from silkie.train.arguments import unset_learning_rate_note

    assert training_arguments(recipe(training={"report_to": "none"}), tmp_path, bf16=False).learning_rate == 5e-5
    note = unset_learning_rate_note(recipe(training={}))
    assert note.startswith("training.learning_rate is not set: transformers' default 5e-5 is used (TRL's")
    assert unset_learning_rate_note(recipe(training={"learning_rate": 1e-5})) is None
