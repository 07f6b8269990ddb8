"""What stops a run before it is poisoned or loses work: non-finite loss, gradient norm or weights, a full disk.

Each is an `InputError` (a rerun of the same recipe repeats it): `train_dpo.py` prints it as one line and the
launcher says to fix the cause, not to run again.
"""

from __future__ import annotations

import errno
import math
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from silkie.errors import InputError
from silkie.run_dir import folder_bytes, latest_checkpoint

LOWER_THE_RATE = "lower training.learning_rate, set training.max_grad_norm (e.g. 1.0) or check the data"


class NonFiniteLossError(InputError, FloatingPointError):
    """Raised before the optimizer step when the DPO loss is NaN or infinite (a rerun of the recipe repeats it)."""


class NonFiniteGradientError(InputError, FloatingPointError):
    """Raised before the optimizer step when the gradient norm is NaN or infinite although the loss is finite."""


class NonFiniteWeightsError(InputError, FloatingPointError):
    """Raised instead of writing a checkpoint whose trainable weights hold NaN or infinity."""


class DiskFullError(InputError, OSError):
    """The disk filled up while a checkpoint or the adapter was written (the partial files are removed)."""


def untouched(working: Path) -> str:
    """`the last complete checkpoint, checkpoint-N, is untouched` (or that none had been written)."""
    last = latest_checkpoint(working)
    return f"the last complete checkpoint, {last.name}, is untouched" if last else "no checkpoint had been written"


def check_grad_norm(norm: float | torch.Tensor | None, step: int, working: Path, deepspeed: bool = False) -> None:
    """NonFiniteGradientError when the step's gradient norm is NaN or infinite. The Trainer's optimizer has not
    applied it yet; DeepSpeed's engine steps inside backward, so under DeepSpeed the step has already run (its
    weights are then never saved: the run stops here)."""
    if norm is None:
        return
    value = float(norm)
    if not math.isfinite(value):
        when = (
            "stopping after DeepSpeed's optimizer step (it steps inside backward); nothing of it is saved"
            if deepspeed
            else "stopping before the optimizer step"
        )
        raise NonFiniteGradientError(
            f"non-finite gradient norm ({value}) at step {step} with a finite loss; {when}. "
            f"{untouched(working).capitalize()}; {LOWER_THE_RATE}."
        )


def first_nonfinite_weight(model: nn.Module) -> str | None:
    """The name of the first trainable parameter holding NaN or infinity on this rank (ZeRO-3: its own shard)."""
    for name, param in model.named_parameters():
        if param.requires_grad:
            local = getattr(param, "ds_tensor", param)  # ZeRO-3 keeps each rank's partition there
            if local.numel() and not torch.isfinite(local.detach()).all():
                return name
    return None


def nonfinite_weights_error(name: str | None, step: int, working: Path) -> NonFiniteWeightsError:
    """The error for trainable weights that went non-finite by `step` (`name`: the first one on this rank)."""
    where = f" (first: {name})" if name else " (on another process)"
    return NonFiniteWeightsError(
        f"non-finite trainable weights{where} after step {step}; not saving checkpoint-{step}. "
        f"{untouched(working).capitalize()}; {LOWER_THE_RATE}."
    )


def _disk_full(err: BaseException, folder: Path, needed: int) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    # torch.save reports ENOSPC as "file write failed", safetensors as an I/O error string
    if "No space left on device" in text or "Disk quota exceeded" in text:
        return True
    return "write failed" in text and shutil.disk_usage(folder).free < max(needed, 1 << 20)


def _size(count: int) -> str:
    return f"{count / 2**20:.1f} MiB ({count} bytes)"


@contextmanager
def disk_space_guard(partial: Path, working: Path, what: str) -> Iterator[None]:
    """Around writing `partial` (a staged checkpoint or the adapter folder) in `working`: a full disk removes the
    partial files and becomes one DiskFullError naming the folder, the bytes it needed and what is kept."""
    previous = latest_checkpoint(working)
    try:
        yield
    except Exception as err:
        estimate = folder_bytes(previous) if previous is not None else 0
        if not _disk_full(err, working, estimate):
            raise
        written = folder_bytes(partial)
        shutil.rmtree(partial, ignore_errors=True)
        free = shutil.disk_usage(working).free
        needed = (
            f"about {_size(estimate)} (the size of {previous.name})"
            if estimate
            else f"more than the {_size(written)} written before the disk filled"
        )
        kept = f"the last complete checkpoint, {previous.name}, is intact" if previous else "no checkpoint was kept"
        raise DiskFullError(
            f"no space left on the disk of {working} while writing {what}: it needs {needed} and {_size(free)} are "
            f"free; removed the partial {partial.name}, {kept}; free space (or lower training.save_total_limit) and "
            "launch again"
        ) from None
