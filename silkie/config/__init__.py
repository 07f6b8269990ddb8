"""The recipe: typed sections, `training:` keys, YAML in and out, the names of families and losses. Torch-free."""

from silkie.errors import RecipeError

from .cluster import DeepSpeedSection, LaunchSection, SlurmSection
from .data_section import DataSection
from .dpo_section import DPOSection
from .lora_section import LoraSection
from .model_section import ModelSection
from .names import BATCH_LEVEL_LOSS_TYPES, F_DIVERGENCE_LOSS_TYPES, F_DIVERGENCES, FAMILIES, LOSS_TYPES
from .recipe import Recipe, load_recipe, recipe_from_dict, save_recipe
from .training import REPORT_TO_CHOICES, TRAINING_CHOICES, TRAINING_KEYS, TRAINING_RANGES
from .yaml_io import dump_yaml, parse_yaml

__all__ = [
    "BATCH_LEVEL_LOSS_TYPES",
    "F_DIVERGENCES",
    "F_DIVERGENCE_LOSS_TYPES",
    "FAMILIES",
    "LOSS_TYPES",
    "REPORT_TO_CHOICES",
    "TRAINING_CHOICES",
    "TRAINING_KEYS",
    "TRAINING_RANGES",
    "DataSection",
    "DeepSpeedSection",
    "DPOSection",
    "LaunchSection",
    "LoraSection",
    "ModelSection",
    "Recipe",
    "RecipeError",
    "SlurmSection",
    "dump_yaml",
    "load_recipe",
    "parse_yaml",
    "recipe_from_dict",
    "save_recipe",
]
