"""TR-DPO (`dpo.sync_ref_model`, Gorbatovski et al. 2024): every `dpo.ref_model_sync_steps` optimizer steps the
reference moves toward the policy, ref <- alpha * policy + (1 - alpha) * ref, parameter by parameter (TRL's
`SyncRefModelCallback` rule). Under LoRA the reference is a snapshot of the policy's trainable tensors (the adapters
and any fully trained module), swapped in for the reference pass; under full fine-tuning the frozen reference copy
is mixed in place. Either state is saved in every checkpoint, so a resumed run goes on from the same reference."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import TrainerCallback

from silkie.errors import InputError
from silkie.run_dir import REFERENCE_SYNC_NAME


@torch.no_grad()
def mix_toward(target: torch.Tensor, source: torch.Tensor, alpha: float) -> None:
    """`target <- alpha * source + (1 - alpha) * target`, in place (alpha 1: a copy of `source`)."""
    target.lerp_(source.to(device=target.device, dtype=target.dtype), alpha)


@contextmanager
def whole(params: list[nn.Parameter], modify: bool = False) -> Iterator[bool]:
    """The parameters whole inside: ZeRO-3 gathers its partitioned ones (a collective: every rank enters), others
    are whole already. Yields whether this rank writes: under ZeRO-3 rank 0, whose values are spread back to every
    rank's partition on exit; otherwise every rank writes its own replica."""
    if not any(hasattr(p, "ds_id") for p in params):
        yield True
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
        yield not modify or dist.get_rank() == 0


def _main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class AdapterSnapshotReference:
    """LoRA's moving reference: the policy with its trainable tensors replaced by an fp32 snapshot of them. At
    the start the snapshot is the policy's own (zero adapters: the model the run starts from). Mixing the factors
    A and B one by one is TR-DPO's parameter rule on the trained parameters; for alpha < 1 the reference's weight
    change B_ref A_ref is not exactly alpha B A + (1 - alpha) B_ref A_ref (alpha 1, the hard update, is exact)."""

    def __init__(self, policy: nn.Module):
        trainable = {name: p for name, p in policy.named_parameters() if p.requires_grad}
        if not trainable:
            raise InputError("dpo.sync_ref_model: the policy has no trainable parameters to move the reference by")
        with whole(list(trainable.values())):
            self.snapshot = {name: p.detach().float().clone() for name, p in trainable.items()}
        self._kept: dict[str, torch.Tensor] = {}  # the policy's values during a swap (buffers reused)

    def _parameters(self, policy: nn.Module) -> dict[str, nn.Parameter]:
        params = dict(policy.named_parameters())
        missing = [name for name in self.snapshot if name not in params]
        if missing:
            raise RuntimeError(f"dpo.sync_ref_model: the policy has no parameter {missing[0]} (its trained tensors "
                               "were renamed after the trainer was built)")  # fmt: skip
        return {name: params[name] for name in self.snapshot}

    def _on_device(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """The snapshot of `name` on its parameter's device (moved once: the trainer places the model late)."""
        if self.snapshot[name].device != param.device:
            self.snapshot[name] = self.snapshot[name].to(param.device)
        return self.snapshot[name]

    def update(self, policy: nn.Module, alpha: float) -> None:
        """Mix the policy's trainable tensors into the snapshot (every rank keeps the whole snapshot)."""
        params = self._parameters(policy)
        with whole(list(params.values())):
            for name, param in params.items():
                mix_toward(self._on_device(name, param), param.detach(), alpha)

    @contextmanager
    def swapped_in(self, policy: nn.Module) -> Iterator[None]:
        """The policy scores as the reference inside, in eval mode (no dropout, as TRL's reference model): its
        trainable tensors hold the snapshot (written into their storage, not as new tensors, so DeepSpeed's flat
        buffers and anything holding the parameters see it) and get their exact values back afterwards. Autocast's
        cache of low-precision weight copies is cleared on both sides, else a pass would reuse the other's."""
        params = self._parameters(policy)
        with whole(list(params.values()), modify=True) as writer, torch.no_grad():
            for name, param in params.items() if writer else ():  # .data: no version bump for saved tensors
                kept = self._kept.get(name)
                if kept is None or kept.shape != param.shape or kept.device != param.device:
                    kept = self._kept[name] = torch.empty_like(param.data)
                kept.copy_(param.data)
                param.data.copy_(self._on_device(name, param))
        torch.clear_autocast_cache()
        training = policy.training
        policy.eval()
        try:
            yield
        finally:
            policy.train(training)
            with whole(list(params.values()), modify=True) as writer, torch.no_grad():
                for name, param in params.items() if writer else ():
                    param.data.copy_(self._kept[name])
            torch.clear_autocast_cache()

    def shapes(self) -> dict[str, torch.Size]:
        return {name: tensor.shape for name, tensor in self.snapshot.items()}

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        return {name: tensor.contiguous().cpu() for name, tensor in self.snapshot.items()} if _main_process() else None

    def load(self, reader: Any) -> None:
        for name, tensor in self.snapshot.items():
            tensor.copy_(reader.get_tensor(name))


class FrozenCopyReference:
    """Full fine-tuning's (or `model.ref_model`'s) moving reference: the frozen copy, mixed in place."""

    def __init__(self, policy: nn.Module, reference: nn.Module):
        self.reference = reference
        ours = {name: getattr(p, "ds_shape", p.shape) for name, p in policy.named_parameters()}  # ZeRO-3: whole
        theirs = {name: getattr(p, "ds_shape", p.shape) for name, p in reference.named_parameters()}
        for name, shape in ours.items():
            if theirs.get(name) != shape:
                found = "no such parameter" if name not in theirs else f"shape {tuple(theirs[name])}"
                raise InputError(
                    f"dpo.sync_ref_model: the reference's {name} is {found}, the policy's has shape {tuple(shape)}: "
                    "TR-DPO mixes the two parameter by parameter, so model.ref_model must have the policy's "
                    "architecture and size"
                )

    def update(self, policy: nn.Module, alpha: float) -> None:
        """Mix every policy parameter into the reference's of the same name (under ZeRO-3 one pair gathered at a
        time)."""
        reference = dict(self.reference.named_parameters())
        for name, param in policy.named_parameters():
            with whole([param, reference[name]], modify=True) as writer:
                if writer:
                    mix_toward(reference[name].data, param.detach(), alpha)

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """The reference's parameters on the main process (None elsewhere; every rank takes part in ZeRO-3's
        gathers)."""
        main = _main_process()
        state = {}
        for name, param in self.reference.named_parameters():
            with whole([param]):
                if main:
                    state[name] = param.detach().contiguous().cpu().clone()
        return state if main else None

    def shapes(self) -> dict[str, torch.Size]:
        return {name: getattr(p, "ds_shape", p.shape) for name, p in self.reference.named_parameters()}

    def load(self, reader: Any) -> None:
        for name, param in self.reference.named_parameters():
            with whole([param], modify=True) as writer, torch.no_grad():
                if writer:
                    param.data.copy_(reader.get_tensor(name))


def _check_saved(reader: Any, shapes: dict[str, torch.Size], source: Path) -> None:
    """`InputError` naming the first tensor a saved reference lacks or holds in another shape (checked on every
    rank before any ZeRO-3 gather, so all ranks stop together)."""
    saved = set(reader.keys())
    for name, shape in shapes.items():
        found = tuple(reader.get_slice(name).get_shape()) if name in saved else None
        if found != tuple(shape):
            what = "misses it" if found is None else f"has shape {found}"
            raise InputError(f"{source}: the saved TR-DPO reference {what} for {name} (expected shape "
                             f"{tuple(shape)}); it was written by another model or recipe")  # fmt: skip


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
        """Write the reference's state into a checkpoint folder (called on every rank: ZeRO-3 gathers; the main
        process writes)."""
        state = self.reference.state_dict()
        if state is not None:
            save_file(state, str(checkpoint / REFERENCE_SYNC_NAME))

    def load(self, checkpoint: Path) -> None:
        """The reference as a checkpoint saved it, read a tensor at a time; `InputError` naming the file when it is
        missing or foreign."""
        path = checkpoint / REFERENCE_SYNC_NAME
        if not path.is_file():
            raise InputError(f"{path} is missing: the checkpoint holds no TR-DPO reference (dpo.sync_ref_model) to go "
                             "on from; train anew in another --working, or with --force")  # fmt: skip
        with safe_open(str(path), framework="pt") as reader:
            _check_saved(reader, self.reference.shapes(), path)
            self.reference.load(reader)


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
