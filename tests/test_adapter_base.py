"""An adapter given a base of another family (merge, chat, evaluate): one line naming the family it was trained
on, found from its run's recipe or from the base folder in its adapter_config.json, before anything loads."""

from __future__ import annotations

import json

import pytest

from silkie.tools.cli import ToolError
from silkie.tools.common import trained_family
from silkie.tools.merge import merge_adapter

from .hf_fixtures import BUILDERS


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    from silkie.dev.tiny_qwen_vl import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("bases")
    return {**{family: BUILDERS[family](root / family) for family in ("qwen2_vl", "llava")},
            "qwen_vl": build_tiny_checkpoint(root / "qwen_vl")}  # fmt: skip


def adapter(folder, base, recipe_family=None):
    (folder / "adapter").mkdir(parents=True)
    config = {"base_model_name_or_path": str(base), "peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}
    (folder / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter" / "tokenizer_config.json").write_text("{}")
    if recipe_family:
        (folder / "config.yaml").write_text(f"model: {{path: {base}, family: {recipe_family}}}\n")
    return folder / "adapter"


def test_the_trained_on_family_comes_from_the_run_or_the_named_base(bases, tmp_path):
    assert trained_family(adapter(tmp_path / "named", bases["llava"])) == "llava"
    assert trained_family(adapter(tmp_path / "run", tmp_path / "gone", recipe_family="llava")) == "llava"
    assert trained_family(adapter(tmp_path / "unknown", tmp_path / "gone")) is None


def test_merge_refuses_an_adapter_of_another_family_in_one_line(bases, tmp_path):
    trained = adapter(tmp_path / "run", bases["llava"])
    with pytest.raises(ToolError) as refused:
        merge_adapter(bases["qwen2_vl"], trained, tmp_path / "merged")
    assert str(refused.value) == (
        f"the adapter in {trained} was trained on a llava model ({bases['llava']}), not on "
        f"{bases['qwen2_vl']} (qwen2_vl); give it a llava base model"
    )
    assert not (tmp_path / "merged").exists()


def test_the_merged_config_says_one_dtype_throughout(bases):
    import torch
    from transformers import AutoConfig

    from silkie.tools.merge import _set_dtype_flags

    config = AutoConfig.from_pretrained(bases["qwen2_vl"])
    _set_dtype_flags(config, torch.bfloat16)
    saved = config.to_dict()
    assert saved["dtype"] == saved["text_config"]["dtype"] == saved["vision_config"]["dtype"] == "bfloat16"


def test_a_qwen_vl_adapter_on_a_transformers_base_names_its_family(bases, tmp_path):
    """Its tokenizer file (qwen.tiktoken) would also tell, but less: the family it was trained on comes first."""
    trained = adapter(tmp_path / "run", bases["qwen_vl"])
    (trained / "qwen.tiktoken").write_text("")
    with pytest.raises(ToolError, match=r"was trained on a qwen_vl model .*; give it a qwen_vl base model"):
        merge_adapter(bases["qwen2_vl"], trained, tmp_path / "merged")
