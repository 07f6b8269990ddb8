"""Qwen3-VL MoE's expert weights on disk and in memory.

The released checkpoints store each layer's experts as `mlp.experts.gate_up_proj` [E, H, 2I] and
`mlp.experts.down_proj` [E, I, H]; transformers 5 holds them transposed ([E, 2I, H], [E, H, I]) and transposes a
checkpoint tensor on load unless it already has the parameter's shape (`Transpose(check_dims=True)`). Its
`save_pretrained` writes its own layout (under ZeRO-3, the release's: the same check meets a partitioned
placeholder). Two consequences handled here:
- under ZeRO-3 the parameter is a partitioned placeholder whose shape is never the tensor's, so every tensor was
  transposed and a folder in transformers' layout (saved by transformers 5: a merged model, another tool's output)
  failed to load (`expert_shapes_seen_under_zero3` compares with the full shape instead);
- Silkie writes its finished folders (merged models, a full fine-tuning run's model, the tiny stand-in) in the
  release's layout (`write_release_layout`), which every loader of the released model reads. Where the two layouts
  share a shape (H = 2I or H = I: no release) a folder cannot tell them apart and is left as it is.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from silkie.models.qwen_vl.checkpoint_io import weight_files

EXPERT_WEIGHTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
logger = logging.getLogger(__name__)


@contextmanager
def expert_shapes_seen_under_zero3() -> Iterator[None]:
    """While loading: transformers' shape-checked transposes compare a checkpoint tensor with a ZeRO-3 partitioned
    parameter's full shape (`ds_shape`), so both layouts load as they do without ZeRO-3. Other loads are unchanged."""
    from transformers.core_model_loading import Transpose

    original = Transpose.convert

    def convert(self: Any, input_dict: dict, source_patterns: list, target_patterns: list, **kwargs: Any) -> dict:
        model, name = kwargs.get("model"), kwargs.get("full_layer_name")
        full = getattr(model.get_parameter(name), "ds_shape", None) if self.check_dims and model and name else None
        if full is not None:
            tensor = next(iter(input_dict.values()))
            tensor = tensor[0] if isinstance(tensor, list) else tensor
            if tuple(tensor.shape) == tuple(full):  # already the model's layout: kept as it is
                return {self.get_target_pattern(input_dict, source_patterns, target_patterns): tensor}
        return original(self, input_dict, source_patterns, target_patterns, **kwargs)

    Transpose.convert = convert
    try:
        yield
    finally:
        Transpose.convert = original


def write_release_layout(folder: str | Path) -> int:
    """Rewrite the expert weights of a checkpoint folder that are in transformers 5's layout in the release's,
    shard by shard (config.json gives the widths; a weight already in the release's layout stays; a weight whose
    two layouts share a shape, H = 2I or H = I, stays too, with a warning); returns how many tensors were
    transposed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = Path(folder)
    text = json.loads((folder / "config.json").read_text()).get("text_config", {})
    hidden, inner = text["hidden_size"], text["moe_intermediate_size"]
    internal = {EXPERT_WEIGHTS[0]: (2 * inner, hidden), EXPERT_WEIGHTS[1]: (hidden, inner)}  # transformers' [E, ...]
    ambiguous = [name for name, shape in internal.items() if shape[0] == shape[1]]
    if ambiguous:
        logger.warning("%s: %s square in both layouts; left as saved", folder, ", ".join(ambiguous))
        internal = {name: shape for name, shape in internal.items() if name not in ambiguous}
    changed = 0
    for shard in weight_files(folder):
        with safe_open(shard, "pt") as handle:
            metadata = handle.metadata()
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
        experts = [key for key in tensors for name, shape in internal.items()
                   if key.endswith(name) and tuple(tensors[key].shape[1:]) == shape]  # fmt: skip
        for key in experts:
            tensors[key] = tensors[key].transpose(1, 2).contiguous()
        if experts:
            save_file(tensors, shard, metadata=metadata)
            changed += len(experts)
    return changed
