"""Never lose or poison a run: damaged checkpoints are found and moved aside, non-finite gradients and weights stop
before they are applied or saved, a full disk is one line, a cut-short evaluation runs again after the resume."""

from __future__ import annotations

import errno
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from silkie.run_dir import MANIFEST_NAME, checkpoint_status, latest_checkpoint, resume_plan, verify_checkpoint
from silkie.train.guards import NonFiniteGradientError, NonFiniteWeightsError

from .train_fixtures import FAST, asset_overrides, read_metrics, run_in_process

SHORT = FAST + ["data.max_prompts=16", "training.save_steps=2", "training.save_total_limit=null"]


def _truncate_adapter(checkpoint):
    path = checkpoint / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _scramble_optimizer(checkpoint):  # same size: only the checksum can tell
    path = checkpoint / "optimizer.pt"
    path.write_bytes(os.urandom(path.stat().st_size))


def _empty_state(checkpoint):
    (checkpoint / "trainer_state.json").write_text("")


DAMAGE = {
    "adapter_model.safetensors": _truncate_adapter,
    "optimizer.pt": _scramble_optimizer,
    "trainer_state.json": _empty_state,
}


@pytest.fixture(scope="module")
def six_steps(assets, tmp_path_factory):
    """A finished 6-step run with checkpoints 2, 4 and 6 (each with a manifest)."""
    working = tmp_path_factory.mktemp("six") / "run"
    run_in_process(working, asset_overrides(assets) + SHORT + ["training.max_steps=6"])
    return working


def test_every_checkpoint_has_a_manifest_written_last(six_steps):
    checkpoint = six_steps / "checkpoint-6"
    manifest = json.loads((checkpoint / MANIFEST_NAME).read_text())["files"]
    files = sorted(p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.name != MANIFEST_NAME)
    assert sorted(manifest) == files and {"adapter_model.safetensors", "optimizer.pt", "silkie_run.json"} <= set(files)
    assert manifest["optimizer.pt"]["size"] == (checkpoint / "optimizer.pt").stat().st_size
    assert len(manifest["optimizer.pt"]["sha256"]) == 64
    assert verify_checkpoint(checkpoint) is None


@pytest.mark.parametrize("damaged", sorted(DAMAGE))
def test_a_damaged_file_in_the_newest_checkpoint_is_moved_aside_and_the_run_resumes_from_the_one_before(
    assets, six_steps, tmp_path, damaged, capsys
):
    working = tmp_path / "run"
    shutil.copytree(six_steps, working)
    for name in ("FINISHED", "adapter", "final_metrics.json"):  # as if the run had stopped after step 6's save
        shutil.rmtree(working / name) if (working / name).is_dir() else (working / name).unlink()
    DAMAGE[damaged](working / "checkpoint-6")
    problem = verify_checkpoint(working / "checkpoint-6")
    assert problem is not None and problem.startswith(damaged)
    if damaged != "optimizer.pt":  # the launcher's quick check (sizes) sees these two already
        status = checkpoint_status(working)
        assert status.startswith(f"{working / 'checkpoint-6'} is damaged ({damaged}")
        assert status.endswith(f"the next launch moves it aside and resumes from {working / 'checkpoint-4'}")
    result = run_in_process(working, asset_overrides(assets) + SHORT + ["training.max_steps=6"])
    out = capsys.readouterr().out
    (moved,) = working.glob("corrupt-checkpoint-6-*")
    assert f"checkpoint-6 is damaged ({problem}): moved to {moved.name}/; resuming from checkpoint-4" in out
    assert "resuming from checkpoint-4" in out and result["step"] == 6
    assert (moved / damaged).is_file()  # kept as it was, never deleted
    assert verify_checkpoint(working / "checkpoint-6") is None  # written again by the resumed run
    straight = {r["step"]: r["loss"] for r in read_metrics(six_steps) if "loss" in r}
    resumed = {r["step"]: r["loss"] for r in read_metrics(working) if "loss" in r}
    for step in (5, 6):
        assert resumed[step] == pytest.approx(straight[step], abs=1e-5)
    assert resume_plan(working)[1] == []


def test_checkpoints_without_a_manifest_are_checked_for_structure(six_steps, tmp_path):
    for damaged, damage in DAMAGE.items():
        checkpoint = tmp_path / damaged / "checkpoint-6"
        shutil.copytree(six_steps / "checkpoint-6", checkpoint)
        (checkpoint / MANIFEST_NAME).unlink()  # saved before manifests existed
        assert verify_checkpoint(checkpoint) is None
        damage(checkpoint)
        assert verify_checkpoint(checkpoint).startswith(damaged), damaged
    missing = {  # a resume without them silently starts a fresh optimizer or schedule, or fails in the Trainer
        "optimizer.pt": "optimizer.pt is missing (a resume would start a fresh optimizer)",
        "scheduler.pt": "scheduler.pt is missing (a resume would restart the learning-rate schedule)",
        "adapter_model.safetensors": "no weights (adapter_model.safetensors, model.safetensors or their .bin) are in "
        "it",
    }
    for name, said in missing.items():
        checkpoint = tmp_path / f"without-{name}" / "checkpoint-6"
        shutil.copytree(six_steps / "checkpoint-6", checkpoint)
        (checkpoint / MANIFEST_NAME).unlink()
        (checkpoint / name).unlink()
        assert verify_checkpoint(checkpoint) == said


def test_a_scrambled_run_layout_file_is_left_to_the_checksum_not_a_launcher_crash(six_steps, tmp_path):
    from silkie.run_dir import RUN_LAYOUT_FILE, world_size_problem

    checkpoint = tmp_path / "checkpoint-6"
    shutil.copytree(six_steps / "checkpoint-6", checkpoint)
    layout = checkpoint / RUN_LAYOUT_FILE
    layout.write_bytes(b"\xff" * layout.stat().st_size)  # same size: the launcher's quick check passes it
    assert world_size_problem(checkpoint, 1) is None and verify_checkpoint(checkpoint, checksums=False) is None
    assert verify_checkpoint(checkpoint) == f"{RUN_LAYOUT_FILE} does not match its SHA-256 in the manifest"


def test_force_with_a_shorter_run_goes_back_to_the_checkpoint_at_its_new_end(assets, six_steps, tmp_path):
    """Shortening max_steps resumed from the newest checkpoint, past the new end: FINISHED and the adapter were the
    longer run's, under a config.yaml that said otherwise."""
    from silkie.config import load_recipe
    from silkie.launch.workdir import LaunchError, inspect_workdir, prepare_workdir

    from .slurm_cluster import DEMO_RECIPE

    working = tmp_path / "run"
    shutil.copytree(six_steps, working)
    (working / "eval_pairs_eval.json").write_text("{}")  # `silkie evaluate`'s scores of the old adapter
    overrides = asset_overrides(assets) + SHORT + ["training.max_steps=4"]
    recipe = load_recipe(DEMO_RECIPE, overrides)
    with pytest.raises(LaunchError, match=r"--force to go on from checkpoint-4 \(the later checkpoint-6 moved aside\)"):
        inspect_workdir(working, recipe)
    plan = inspect_workdir(working, recipe, force=True)
    assert plan.resume_from == working / "checkpoint-4"
    moved = {original.name for original, _ in plan.backups}
    assert {"checkpoint-6", "adapter", "FINISHED", "eval_pairs_eval.json"} <= moved and "checkpoint-4" not in moved
    prepare_workdir(plan, recipe)
    assert {json.loads(line)["step"] for line in (working / "metrics.jsonl").read_text().splitlines()} <= {1, 2, 3, 4}
    result = run_in_process(working, overrides)
    assert result["step"] == 4 and json.loads((working / "FINISHED").read_text())["step"] == 4
    assert [r["step"] for r in read_metrics(working) if "loss" in r] == [1, 2, 3, 4]  # not the dropped 5 and 6
    adapter = load_file(working / "adapter" / "adapter_model.safetensors")
    at_step_4 = load_file(working / "checkpoint-4" / "adapter_model.safetensors")
    assert adapter.keys() == at_step_4.keys() and all(torch.equal(adapter[k], at_step_4[k]) for k in adapter)
    assert not (working / "checkpoint-6").exists() and not (working / "eval_pairs_eval.json").exists()
    (backup,) = working.glob("backup-*")
    assert (backup / "checkpoint-6" / "adapter_model.safetensors").is_file()
    assert (backup / "eval_pairs_eval.json").is_file()
    assert [r["step"] for r in map(json.loads, (backup / "metrics.jsonl").read_text().splitlines()) if "loss" in r
            ] == [1, 2, 3, 4, 5, 6]  # the whole history, kept aside  # fmt: skip
    shorter = load_recipe(DEMO_RECIPE, asset_overrides(assets) + SHORT + ["training.max_steps=1"])
    plan = inspect_workdir(working, shorter, force=True)  # below every checkpoint: a start from step 0
    assert plan.resume_from is None and "training starts from step 0" in plan.message
    assert {"checkpoint-2", "checkpoint-4", "metrics.jsonl"} <= {original.name for original, _ in plan.backups}


def test_a_non_finite_gradient_with_a_finite_loss_stops_before_the_optimizer_step(assets, tmp_path, monkeypatch):
    """Without clipping (max_grad_norm 0) the optimizer applied a NaN gradient and the next save wrote NaN weights,
    which a relaunch then resumed."""
    from silkie.train.trainer import SilkieDPOTrainer

    original = SilkieDPOTrainer.training_step

    def nan_gradient_in_step_3(self, model, inputs, num_items_in_batch=None):
        loss = original(self, model, inputs, num_items_in_batch)
        if self.state.global_step == 2:
            next(p for p in model.parameters() if p.requires_grad).grad[0, 0] = float("nan")
        return loss

    monkeypatch.setattr(SilkieDPOTrainer, "training_step", nan_gradient_in_step_3)
    working = tmp_path / "run"
    overrides = asset_overrides(assets) + FAST + ["data.max_prompts=16", "training.save_steps=1"]
    with pytest.raises(NonFiniteGradientError) as caught:
        run_in_process(working, overrides + ["training.max_steps=5", "training.max_grad_norm=0"])
    assert str(caught.value) == (
        "non-finite gradient norm (nan) at step 3 with a finite loss; stopping before the optimizer step. The last "
        "complete checkpoint, checkpoint-2, is untouched; lower training.learning_rate, set training.max_grad_norm "
        "(e.g. 1.0) or check the data."
    )
    assert latest_checkpoint(working).name == "checkpoint-2"
    weights = load_file(working / "checkpoint-2" / "adapter_model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


def test_a_checkpoint_is_never_written_with_non_finite_weights(assets, tmp_path, monkeypatch):
    from silkie.train.preemption import PreemptionCallback

    original = PreemptionCallback.on_step_end

    def poison_after_step_2(self, args, state, control, **kwargs):
        if state.global_step == 2:
            with torch.no_grad():
                next(p for p in kwargs["model"].parameters() if p.requires_grad).fill_(float("inf"))
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(PreemptionCallback, "on_step_end", poison_after_step_2)
    working = tmp_path / "run"
    overrides = asset_overrides(assets) + FAST + ["data.max_prompts=16", "training.save_steps=1"]
    with pytest.raises(NonFiniteWeightsError, match=r"^non-finite trainable weights \(first: base_model\.model\..*"
                       r"lora_A\.default\.weight\) after step 2; not saving checkpoint-2\. The last complete "
                       r"checkpoint, checkpoint-1, is untouched"):  # fmt: skip
        run_in_process(working, overrides + ["training.max_steps=4"])
    assert latest_checkpoint(working).name == "checkpoint-1"
    assert not list(working.glob("tmp-checkpoint-*"))


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_last_checkpoint(assets, tmp_path, monkeypatch, capsys):
    from transformers import Trainer

    import train_dpo
    from silkie.launch.local import _report

    original = Trainer._save_optimizer_and_scheduler

    def disk_fills_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            (tmp_path / "run" / "tmp-checkpoint-4" / "optimizer.pt").write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", disk_fills_at_step_4)
    working = tmp_path / "run"
    args = ["--config", "dpo_config/demo.yaml", "--working", str(working), *asset_overrides(assets), *SHORT]
    assert train_dpo.main(args + ["training.max_steps=6"]) == 2
    err = capsys.readouterr().err
    line = err[err.index("error: ") :].splitlines()[0]  # after tqdm's bar, which ends without a newline
    size = sum(p.stat().st_size for p in (working / "checkpoint-2").rglob("*") if p.is_file())
    assert line.startswith(
        f"error: no space left on the disk of {working} while writing checkpoint-4: it needs about "
        f"{size / 2**20:.1f} MiB ({size} bytes) (the size of checkpoint-2) and "
    )
    assert line.endswith(
        "are free; removed the partial tmp-checkpoint-4, the last complete checkpoint, checkpoint-2, is intact; free "
        "space (or lower training.save_total_limit) and launch again"
    )
    assert not (working / "tmp-checkpoint-4").exists()
    assert latest_checkpoint(working).name == "checkpoint-2"
    assert (working / "ERROR").read_text().strip() == line.removeprefix("error: ")
    assert _report(working, 2, None) == 2
    said = capsys.readouterr().err
    assert f"(the last complete checkpoint, {working / 'checkpoint-2'}, is intact); fix it and launch again" in said
    assert "run the same command again" not in said


def test_lora_targets_that_match_no_layer_are_refused_when_the_model_loads(assets):
    """peft refuses only a list of which nothing matches (with every module name); a list where one entry matches
    nothing silently trained fewer layers than the recipe says."""
    from silkie.config import LoraSection, ModelSection
    from silkie.errors import InputError
    from silkie.models.loading import build_policy

    model = ModelSection(path=str(assets["model"]))
    for targets in (["c_atn"], ["c_attn", "w3"]):
        with pytest.raises(InputError) as caught:
            build_policy(model, LoraSection(r=4, target_modules=targets))
        assert str(caught.value).startswith(
            f"lora.target_modules: {targets[-1]!r} matches no linear layer of the language model; its linear layers "
            "are named c_attn, c_proj, w1, w2 "  # the vision tower's (c_fc, ...) are not the language model's
        )
        assert str(caught.value).endswith("(null: the family's default c_attn, attn.c_proj, w1, w2)")
    built = build_policy(model, LoraSection(r=4, target_modules=["c_attn", "w2"]))
    assert {name.split(".")[-4] for name, _ in built.named_parameters() if "lora_A" in name} == {"c_attn", "w2"}


def test_a_resume_onto_a_swapped_model_folder_is_one_line(assets, six_steps, tmp_path):
    """The folder behind model.path replaced by a model of another size: a 17-line size-mismatch traceback, and the
    launcher's advice to rerun, which failed the same way."""
    from silkie.dev.tiny_qwen_vl import build_tiny_checkpoint
    from silkie.errors import InputError

    working = tmp_path / "run"
    shutil.copytree(six_steps, working)
    for name in ("FINISHED", "adapter", "final_metrics.json"):
        shutil.rmtree(working / name) if (working / name).is_dir() else (working / name).unlink()
    wider = build_tiny_checkpoint(tmp_path / "wider", hidden_size=256)
    overrides = asset_overrides(assets) + SHORT + ["training.max_steps=6", f"model.path={wider}"]
    with pytest.raises(InputError) as refused:
        run_in_process(working, overrides)
    said = str(refused.value)
    assert said.startswith("checkpoint-6 does not fit the model in model.path (") and "\n" not in said
    assert "weights differ in shape from the model's, e.g. size mismatch for " in said
    assert said.endswith("the model folder changed since the run began; point model.path at the model it was "
                         "trained from, or train in another --working")  # fmt: skip
    assert verify_checkpoint(working / "checkpoint-6") is None  # the checkpoint is kept as it was


def test_a_run_shortened_by_epochs_below_its_checkpoint_is_refused_not_finished_at_the_old_step(assets, six_steps,
                                                                                                 tmp_path):
    """Fewer epochs resumed from checkpoint-6 and wrote FINISHED at step 6 under a config of fewer steps."""
    from silkie.errors import InputError

    working = tmp_path / "run"
    shutil.copytree(six_steps, working)
    for name in ("FINISHED", "adapter", "final_metrics.json"):
        shutil.rmtree(working / name) if (working / name).is_dir() else (working / name).unlink()
    overrides = asset_overrides(assets) + SHORT + ["training.max_steps=-1", "training.num_train_epochs=0.1"]
    said = r"^the checkpoint resumed is at step 6, past this recipe's end \(step (\d)\): the run was shortened; set "
    with pytest.raises(InputError, match=said + r"training.max_steps=\1 and launch with --force"):
        run_in_process(working, overrides)
    assert not (working / "FINISHED").exists() and verify_checkpoint(working / "checkpoint-6") is None
