"""TR-DPO (`dpo.sync_ref_model`, Gorbatovski et al. 2024): every `dpo.ref_model_sync_steps` optimizer steps the
reference moves toward the policy, ref <- alpha * policy + (1 - alpha) * ref, parameter by parameter (TRL's
`SyncRefModelCallback` rule). Under LoRA the reference is a snapshot of the policy's trainable tensors (the adapters
and any fully trained module), swapped in for the reference pass; under full fine-tuning the frozen reference copy
is mixed in place. Either state is saved in every checkpoint, so a resumed run goes on from the same reference."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback

from silkie.errors import InputError
from silkie.run_dir import REFERENCE_SYNC_NAME


@torch.no_grad()
def mix_toward(target: torch.Tensor, source: torch.Tensor, alpha: float) -> None:
    """`target <- alpha * source + (1 - alpha) * target`, in place (alpha 1: a copy of `source`)."""
    target.lerp_(source.to(device=target.device, dtype=target.dtype), alpha)


def _contiguous_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}


class AdapterSnapshotReference:
    """LoRA's moving reference: the policy with its trainable tensors replaced by an fp32 snapshot of them. At
    the start the snapshot is the policy's own (zero adapters: the model the run starts from)."""

    def __init__(self, policy: nn.Module):
        trainable = {name: p for name, p in policy.named_parameters() if p.requires_grad}
        if not trainable:
            raise InputError("dpo.sync_ref_model: the policy has no trainable parameters to move the reference by")
        self.snapshot = {name: p.detach().float().clone() for name, p in trainable.items()}

    def _parameters(self, policy: nn.Module) -> dict[str, nn.Parameter]:
        params = dict(policy.named_parameters())
        missing = [name for name in self.snapshot if name not in params]
        if missing:
            raise RuntimeError(f"dpo.sync_ref_model: the policy lost the trainable parameter {missing[0]}")
        return {name: params[name] for name in self.snapshot}

    def update(self, policy: nn.Module, alpha: float) -> None:
        """Mix the policy's trainable tensors into the snapshot."""
        for name, param in self._parameters(policy).items():
            mix_toward(self.snapshot[name], param.detach(), alpha)

    @contextmanager
    def swapped_in(self, policy: nn.Module) -> Iterator[None]:
        """The policy scores as the reference inside: its trainable tensors hold the snapshot (written into their
        storage, not as new tensors, so DeepSpeed's flat buffers and anything holding the parameters see it), and
        get their exact values back afterwards."""
        params = self._parameters(policy)
        kept = {name: param.data.clone() for name, param in params.items()}
        try:
            with torch.no_grad():
                for name, param in params.items():  # .data: no version bump for tensors autograd saved
                    param.data.copy_(self.snapshot[name])
            yield
        finally:
            with torch.no_grad():
                for name, param in params.items():
                    param.data.copy_(kept[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return _contiguous_state(self.snapshot)

    def load_state_dict(self, state: dict[str, torch.Tensor], source: Path) -> None:
        _check_same_tensors(self.snapshot, state, source)
        for name, tensor in state.items():
            self.snapshot[name].copy_(tensor)


class FrozenCopyReference:
    """Full fine-tuning's (or `model.ref_model`'s) moving reference: the frozen copy, mixed in place."""

    def __init__(self, policy: nn.Module, reference: nn.Module):
        self.reference = reference
        ours = {name: p.shape for name, p in policy.named_parameters()}
        theirs = {name: p.shape for name, p in reference.named_parameters()}
        for name, shape in ours.items():
            if theirs.get(name) != shape:
                found = "no such parameter" if name not in theirs else f"shape {tuple(theirs[name])}"
                raise InputError(
                    f"dpo.sync_ref_model: the reference's {name} is {found}, the policy's has shape {tuple(shape)}: "
                    "TR-DPO mixes the two parameter by parameter, so model.ref_model must have the policy's "
                    "architecture and size"
                )

    def update(self, policy: nn.Module, alpha: float) -> None:
        """Mix every policy parameter into the reference's of the same name."""
        reference = dict(self.reference.named_parameters())
        for name, param in policy.named_parameters():
            mix_toward(reference[name].data, param.detach(), alpha)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return _contiguous_state(dict(self.reference.named_parameters()))

    def load_state_dict(self, state: dict[str, torch.Tensor], source: Path) -> None:
        params = dict(self.reference.named_parameters())
        _check_same_tensors(params, state, source)
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].data.copy_(tensor)


def _check_same_tensors(ours: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], source: Path) -> None:
    for name, tensor in ours.items():
        if name not in saved or saved[name].shape != tensor.shape:
            found = "misses it" if name not in saved else f"has shape {tuple(saved[name].shape)}"
            raise InputError(f"{source}: the saved TR-DPO reference {found} for {name} (expected shape "
                             f"{tuple(tensor.shape)}); it was written by another model or recipe")  # fmt: skip


class ReferenceSync:
    """The moving reference of a TR-DPO run: when to update it, and its state in checkpoints."""

    def __init__(self, reference: AdapterSnapshotReference | FrozenCopyReference, alpha: float, every: int):
        self.reference = reference
        self.alpha = alpha
        self.every = every

    @property
    def swaps_into_policy(self) -> bool:
        """True under LoRA: the reference pass runs the policy with the snapshot swapped in."""
        return isinstance(self.reference, AdapterSnapshotReference)

    def due(self, global_step: int) -> bool:
        """Whether the reference moves after optimizer step `global_step`."""
        return global_step > 0 and global_step % self.every == 0

    def update(self, policy: nn.Module) -> None:
        """ref <- alpha * policy + (1 - alpha) * ref."""
        self.reference.update(policy, self.alpha)

    def save(self, checkpoint: Path) -> None:
        """Write the reference's state into a checkpoint folder (main process)."""
        save_file(self.reference.state_dict(), str(checkpoint / REFERENCE_SYNC_NAME))

    def load(self, checkpoint: Path) -> None:
        """The reference as a checkpoint saved it; `InputError` naming the file when it is missing or foreign."""
        path = checkpoint / REFERENCE_SYNC_NAME
        if not path.is_file():
            raise InputError(f"{checkpoint.name} holds no {REFERENCE_SYNC_NAME}: no dpo.sync_ref_model run saved it, "
                             "so the moving reference to resume from is missing; train anew (--force)")  # fmt: skip
        self.reference.load_state_dict(load_file(str(path)), path)


class ReferenceSyncCallback(TrainerCallback):
    """Moves the reference at the end of every `dpo.ref_model_sync_steps`-th optimizer step (before that step's
    evaluation and checkpoint, which then see the moved reference)."""

    def __init__(self, sync: ReferenceSync, unwrapped_policy: Callable[[], nn.Module]):
        self.sync = sync
        self.unwrapped_policy = unwrapped_policy

    def on_step_end(self, args, state, control, **kwargs):
        if self.sync.due(state.global_step):
            self.sync.update(self.unwrapped_policy())
        return control
