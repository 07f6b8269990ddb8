"""The one place a training run is wired: recipe -> data, model, reference, trainer -> adapter, metrics, plot.

`run_training` and friends load lazily: `silkie.train.entry` checks the recipe before torch is imported.
"""

from importlib import import_module
from typing import Any

_LAZY = {
    "run_training": "silkie.train.run",
    "latest_checkpoint": "silkie.run_dir",
    "remove_staging": "silkie.run_dir",
    "build_trainer": "silkie.train.build",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    """Import the public names on first use (they pull in torch)."""
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'silkie.train' has no attribute {name!r}")
