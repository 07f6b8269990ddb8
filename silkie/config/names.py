"""The one list of model families, of preference losses (TRL 1.16's names, plus the vision-aware mdpo and
image_conditional) and f-divergences, of image corruptions, and the shape of a hub id. Torch-free."""

import re

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # a model hub id, "org/name" (else model.path is a folder)
# The one list of model families: recipe name -> (implementation "module:Class", checkpoint config.json model_types)
FAMILY_TABLE: dict[str, tuple[str, tuple[str, ...]]] = {
    "qwen_vl": ("silkie.models.qwen_vl.family:QwenVLFamily", ("qwen",)),
    "qwen2_vl": ("silkie.models.hf_vlm.family:Qwen2VLFamily", ("qwen2_vl",)),
    "qwen2_5_vl": ("silkie.models.hf_vlm.family:Qwen2_5_VLFamily", ("qwen2_5_vl",)),
    "qwen3_vl": ("silkie.models.hf_vlm.qwen3_vl:Qwen3VLFamily", ("qwen3_vl",)),
    "qwen3_vl_moe": ("silkie.models.hf_vlm.qwen3_vl:Qwen3VLMoeFamily", ("qwen3_vl_moe",)),
    "llava": ("silkie.models.hf_vlm.family:LlavaFamily", ("llava",)),
    "internvl": ("silkie.models.hf_vlm.internvl:InternVLFamily", ("internvl",)),
    "gemma3": ("silkie.models.hf_vlm.gemma3:Gemma3Family", ("gemma3",)),
    "gemma4": ("silkie.models.hf_vlm.gemma4:Gemma4Family", ("gemma4",)),
    "qwen3_5": ("silkie.models.hf_vlm.qwen3_5:Qwen3_5Family", ("qwen3_5",)),
    "qwen3_5_moe": ("silkie.models.hf_vlm.qwen3_5:Qwen3_5MoeFamily", ("qwen3_5_moe",)),
}
FAMILIES = tuple(FAMILY_TABLE)
MODEL_TYPES = {model_type: family for family, (_, types) in FAMILY_TABLE.items() for model_type in types}
# the transformers Qwen VLMs: images of any size within model.min_pixels..max_pixels, M-RoPE positions
QWEN_HF_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")
VIDEO_FAMILIES = (*QWEN_HF_FAMILIES, "internvl", "gemma4")  # the families Silkie feeds video to
TILED_FAMILIES = ("internvl",)  # images cut into fixed-size tiles (+ a thumbnail), at most model.max_tiles
# images resized to fill at most model.max_image_tokens soft tokens, one of the budgets the processor allows
SOFT_TOKEN_FAMILIES = ("gemma4",)
SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)
# an image's tokens attend each other both ways (a mask per layer kind): no causal-only flash varlen kernel
BIDIRECTIONAL_IMAGE_FAMILIES = ("gemma3", "gemma4")
NO_FP16_FAMILIES = ("gemma3", "gemma4")  # activations past fp16's range (Gemma's): bf16 or fp32 only
NO_LIGER_FAMILIES = ("gemma4",)  # liger-kernel has no patch function for them (model.liger_kernels)
# linear-attention (gated DeltaNet) layers between the attention ones: a recurrence, which packed rows run as
# sequences, each answer from its prompt's state (`silkie/models/hf_vlm/linear_attention.py`)
RECURRENT_FAMILIES = ("qwen3_5", "qwen3_5_moe")
# mixture-of-experts language models: a router load-balancing loss, expert LoRA
MOE_FAMILIES = ("qwen3_vl_moe", "qwen3_5_moe")
# config.json model_types of checkpoints in a layout Silkie does not load, and what loads them
CONVERT_HINTS = {
    "internvl_chat": "an original (remote-code) InternVL folder; convert it to the -hf layout with transformers' "
    "convert_internvl_weights_to_hf.py (or take OpenGVLab's -hf release), then model.family=internvl",
    "gemma3_text": "a text-only Gemma 3 (gemma-3-1b, gemma-3-270m, MedGemma 27B text); Silkie trains vision-language "
    "models: take a multimodal Gemma 3 (gemma-3-4b-it and larger, model_type gemma3)",
    "gemma4_unified": "Gemma 4 12B (Gemma4UnifiedForConditionalGeneration, a layout of its own), which no family "
    "loads yet; the gemma4 family takes Gemma 4 E2B, E4B, 31B and 26B-A4B (model_type gemma4)",
}

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
    "cpo",
    "simpo",
    "orpo",
    "mdpo",
    "image_conditional",
)
# the losses that read no reference model (TRL's CPOTrainer and ORPOTrainer): an objective of these (and sft)
# computes no reference log-probs, and full fine-tuning keeps no frozen copy for it
REFERENCE_FREE_LOSS_TYPES = ("cpo", "simpo", "orpo")
# the losses that read label_smoothing (as TRL; mdpo in its DPO term)
LABEL_SMOOTHING_LOSS_TYPES = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired", "cpo", "simpo", "mdpo")
# the vision-aware losses score the chosen answer again under a corrupted copy of the image (data.image_corruption)
VISION_LOSS_TYPES = ("mdpo", "image_conditional")
IMAGE_CORRUPTIONS = ("crop", "mask", "noise", "blank")
# the fields a preference file's row is read from (data.columns renames a file's own columns to them)
PREFERENCE_FIELDS = ("id", "prompt", "chosen", "rejected", "system", "image", "images", "video", "videos",
                     "chosen_score", "rejected_score", "conversations", "messages", "rejected_response",
                     "history", "instruction", "input")  # fmt: skip
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# the loss types built on the chosen - rejected score difference, which an f-divergence may replace (as TRL)
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
# losses whose per-pair values belong to the batch (sorted ranks, the batch's chosen NLL): only their mean is a pair's
BATCH_LEVEL_LOSS_TYPES = ("aot", "aot_unpaired", "sft", "orpo")
