"""The one list of model families, of preference losses and f-divergences (TRL 1.16's names), and the shape of a
hub id. Torch-free."""

import re

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # a model hub id, "org/name" (else model.path is a folder)
FAMILIES = ("qwen_vl", "qwen2_vl", "qwen2_5_vl", "llava")  # keys of silkie.models.family.FAMILY_CLASSES

LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# the loss types built on the chosen - rejected score difference, which an f-divergence may replace (as TRL)
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
# losses whose per-pair values belong to the batch (sorted ranks, the batch's chosen NLL): only their mean is a pair's
BATCH_LEVEL_LOSS_TYPES = ("aot", "aot_unpaired", "sft")
