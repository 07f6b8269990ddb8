"""The rules a preference objective's settings must follow, written once: the recipe check (`dpo:` section) and
the loss (`silkie.dpo.losses.DPOObjective`) both ask `objective_problem` and phrase its answer their way. Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .names import (
    F_DIVERGENCE_LOSS_TYPES,
    F_DIVERGENCES,
    LABEL_SMOOTHING_LOSS_TYPES,
    LOSS_TYPES,
    REFERENCE_FREE_LOSS_TYPES,
)

# Other libraries' preference losses that are no loss type here: what to use instead
OTHER_LOSSES = {
    "rpo": "RPO is loss_type [sigmoid, sft] with loss_weights [1, ALPHA]",
    "kto_pair": "kto_pair (removed from TRL) is not supported; bco_pair is the closest",
}
SORTED_LOSS_TYPES = ("aot", "aot_unpaired")  # their per-pair values are by rank: no pair's own loss to weight


@dataclass(frozen=True)
class Problem:
    """A setting that breaks a rule: the `dpo.` key, its value, what the recipe allows (with `choices` when it is
    one of a list) and the plain message a direct caller of the loss gets."""

    key: str
    value: Any
    allowed: str
    message: str
    choices: tuple | None = None


def loss_types_of(loss_type: str | Sequence[str]) -> list[str]:
    """The loss types as a list (a single name, or a list to combine)."""
    return [loss_type] if isinstance(loss_type, str) else list(loss_type)


def uses_reference(loss_type: str | Sequence[str]) -> bool:
    """Whether the objective reads reference log-probs: False for cpo, simpo and orpo, alone or with sft (sft alone
    keeps DPO's reference rewards)."""
    types = loss_types_of(loss_type)
    free = set(types) & set(REFERENCE_FREE_LOSS_TYPES)
    return not free or any(name not in (*REFERENCE_FREE_LOSS_TYPES, "sft") for name in types)


def weighting_problem(loss_types: Sequence[str]) -> Problem | None:
    """WPO's per-pair weights need each pair's own loss, which the sorted (AOT) losses do not have."""
    sorted_ = [name for name in loss_types if name in SORTED_LOSS_TYPES]
    if not sorted_:
        return None
    return Problem(
        "use_weighting",
        True,
        f"false with loss types {sorted_}",
        "sequence_weights (WPO) do not apply to aot/aot_unpaired, whose values are by rank",
    )


def objective_problem(
    loss_type: str | Sequence[str],
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    discopop_tau: float = 0.05,
    use_weighting: bool = False,
) -> Problem | None:
    """The first rule the objective's settings break, or None."""
    types = loss_types_of(loss_type)
    if not types:
        return Problem("loss_type", loss_type, "a loss type or a non-empty list of them", "loss_type is an empty list")
    for name in types:
        if name not in LOSS_TYPES:
            expected = f"expected one of {', '.join(LOSS_TYPES)}"
            if name in OTHER_LOSSES:
                expected = f"{OTHER_LOSSES[name]}; {expected}"
            return Problem("loss_type", name, "", f"unknown loss_type '{name}'; {expected}", choices=LOSS_TYPES)
    if loss_weights is not None and len(loss_weights) != len(types):
        return Problem(
            "loss_weights",
            loss_weights,
            f"{len(types)} weights, one per loss_type",
            f"loss_weights has {len(loss_weights)} entries for {len(types)} loss types",
        )
    if not 0.0 <= label_smoothing < 0.5:
        return Problem(
            "label_smoothing",
            label_smoothing,
            "a number in [0, 0.5)",
            f"label_smoothing must be in [0, 0.5), got {label_smoothing}",
        )
    if label_smoothing > 0.0 and not set(types) & set(LABEL_SMOOTHING_LOSS_TYPES):
        return Problem(
            "label_smoothing",
            label_smoothing,
            f"0 with loss types {types} (it acts on {', '.join(LABEL_SMOOTHING_LOSS_TYPES)})",
            f"label_smoothing is read by none of the loss types {types}",
        )
    if "exo_pair" in types and label_smoothing <= 0.0:
        return Problem(
            "label_smoothing",
            label_smoothing,
            "> 0 for exo_pair (the EXO paper: 1e-3)",
            "exo_pair loss needs label_smoothing > 0 (the EXO paper uses 1e-3)",
        )
    if f_divergence_type not in F_DIVERGENCES:
        expected = f"expected one of {', '.join(F_DIVERGENCES)}"
        message = f"unknown f_divergence_type '{f_divergence_type}'; {expected}"
        return Problem("f_divergence_type", f_divergence_type, "", message, choices=F_DIVERGENCES)
    plain = [name for name in types if name not in F_DIVERGENCE_LOSS_TYPES]
    if f_divergence_type != "reverse_kl" and plain:
        return Problem(
            "f_divergence_type",
            f_divergence_type,
            f"reverse_kl with loss types {plain}",
            f"f_divergence_type '{f_divergence_type}' needs loss types among {', '.join(F_DIVERGENCE_LOSS_TYPES)}",
        )
    if not discopop_tau > 0:
        return Problem("discopop_tau", discopop_tau, "a number > 0", f"discopop_tau must be > 0, got {discopop_tau}")
    return weighting_problem(types) if use_weighting else None
