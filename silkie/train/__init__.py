"""The one place a training run is wired: recipe -> data, model, reference, trainer -> adapter, metrics, plot."""

from .run import latest_checkpoint, remove_staging, run_training

__all__ = ["latest_checkpoint", "remove_staging", "run_training"]
