"""Launcher for DPO runs (torch-free): resolve the recipe, check the run directory, start torchrun or sbatch."""

from .cli import main

__all__ = ["main"]
