"""`training.report_to`: are its trackers installed here? (torch-free: the launcher asks before it starts.)"""

from __future__ import annotations

import importlib.util
from typing import Any

# The module each tracker of `report_to` needs (transformers' integrations refuse to start without it).
TRACKER_MODULES = {
    "azure_ml": "azureml",
    "comet_ml": "comet_ml",
    "mlflow": "mlflow",
    "neptune": "neptune",
    "tensorboard": "tensorboard",
    "trackio": "trackio",
    "wandb": "wandb",
    "codecarbon": "codecarbon",
    "clearml": "clearml",
    "dagshub": "dagshub",
    "flyte": "flytekit",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
    "kubeflow": "kubeflow",
}


def missing_trackers(training: dict[str, Any]) -> str | None:
    """Which `training.report_to` trackers are not installed here, as one line (None when all are): found before a
    launch, not as a traceback after the data loaded."""
    value = training.get("report_to") or []
    names = [value] if isinstance(value, str) else list(value)
    missing = [
        name for name in names
        if name in TRACKER_MODULES and importlib.util.find_spec(TRACKER_MODULES[name]) is None
        and not (name == "tensorboard" and importlib.util.find_spec("tensorboardX") is not None)
    ]  # fmt: skip
    if not missing:
        return None
    packages = " ".join(TRACKER_MODULES[name] for name in missing)
    return f"training.report_to = {value!r}: {', '.join(missing)} is not installed (pip install {packages}, or drop it)"
