"""The model-family seam: registry, unwrapping, recipe checks, LoRA targets and freezing per family."""

from __future__ import annotations

import pytest
from transformers.utils import is_torchvision_available

from silkie.config import LoraSection, ModelSection, RecipeError
from silkie.config.names import RECURRENT_FAMILIES
from silkie.models.family import FAMILY_CLASSES, get_family, unwrap_causal_lm
from silkie.models.loading import apply_lora, freeze_vision, load_base_model

from .hf_fixtures import BUILDERS, model_section

VISION_NAMES = {
    "qwen2_vl": "model.visual.",
    "qwen2_5_vl": "model.visual.",
    "qwen3_vl": "model.visual.",
    "qwen3_vl_moe": "model.visual.",
    "llava": "model.vision_tower.",
    "internvl": "model.vision_tower.",
    "gemma3": "model.vision_tower.",
    "gemma4": "model.vision_tower.",
    "qwen3_5": "model.visual.",
    "qwen3_5_moe": "model.visual.",
}
PROJECTORS = {
    "qwen2_vl": ("model.visual.merger.",),
    "qwen2_5_vl": ("model.visual.merger.",),
    "qwen3_vl": ("model.visual.merger.", "model.visual.deepstack_merger_list."),  # DeepStack mergers project too
    "qwen3_vl_moe": ("model.visual.merger.", "model.visual.deepstack_merger_list."),
    "llava": ("model.multi_modal_projector.",),
    "internvl": ("model.multi_modal_projector.",),
    "gemma3": ("model.multi_modal_projector.",),
    "gemma4": ("model.embed_vision.",),
    "qwen3_5": ("model.visual.merger.",),  # no DeepStack
    "qwen3_5_moe": ("model.visual.merger.",),
}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def folder(request, tmp_path_factory):
    return request.param, BUILDERS[request.param](tmp_path_factory.mktemp(request.param))


def test_unknown_family_and_bad_model_section_give_one_line_errors():
    with pytest.raises(ValueError, match="model.family: unknown family 'gemma'"):
        get_family("gemma")
    for section, needle in (
        (ModelSection(path="m", family="qwen3"), "model.family = 'qwen3'"),
        (ModelSection(path="m", family="qwen_vl", max_pixels=1000), "model.max_pixels = 1000"),
        (ModelSection(path="m", family="qwen2_vl", min_pixels=5000, max_pixels=1000), "model.min_pixels = 5000"),
        (ModelSection(path="m", family="llava", attn_implementation="flex_attention"), "model.attn_implementation"),
    ):
        with pytest.raises(RecipeError, match=needle):
            section.check()
    ModelSection(path="m", family="qwen2_5_vl", min_pixels=3136, max_pixels=200704).check()


def test_a_checkpoint_of_another_family_is_refused_by_name(folder, tmp_path):
    family, path = folder
    other = "llava" if family != "llava" else "qwen2_vl"
    with pytest.raises(
        ValueError, match=f"model.family: {path} holds a .* not a {other} one; set model.family={family}"
    ):
        load_base_model(ModelSection(path=str(path), family=other, dtype="fp32"))
    from silkie.models.loading import load_tokenizer

    with pytest.raises(ValueError, match=f"model.family: {path} holds a .* not a {other} one"):
        load_tokenizer(ModelSection(path=str(path), family=other))
    with pytest.raises(ValueError, match="model.path: .* has no config.json"):
        load_tokenizer(ModelSection(path=str(tmp_path), family=other))


def test_unwrap_finds_the_lm_under_peft_and_names_its_family(folder):
    family, path = folder
    model = apply_lora(load_base_model(model_section(path, family)), LoraSection(r=4), family)
    base, found = unwrap_causal_lm(model)
    assert base is model.get_base_model() and found.owns(base)
    assert type(found) is type(get_family(family)) and set(FAMILY_CLASSES) >= {family}


def test_lora_targets_every_llm_linear_and_the_vision_tower_only_when_asked(folder):
    family, path = folder
    plain = apply_lora(load_base_model(model_section(path, family)), LoraSection(r=4), family)
    names = [n for n, _ in plain.named_parameters() if "lora_A" in n]
    kinds = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in names}
    # a MoE layer's experts are 3-D weights, not linear layers (lora.target_parameters); Qwen3.5 MoE's shared expert
    # is a linear MLP
    mlp = set() if family == "qwen3_vl_moe" else {"gate_proj", "up_proj", "down_proj"}
    mixers = [{"q_proj", "k_proj", "v_proj", "o_proj"}] * 2  # the token mixers of the 2 layers
    if family in RECURRENT_FAMILIES:  # an attention layer, then a linear-attention one
        mixers[1] = {"in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"}
    if family == "gemma4":  # sliding; full with keys as values (no v_proj); sliding; full on the second's keys, values
        mixers = [{"q_proj", "k_proj", "v_proj", "o_proj"}, {"q_proj", "k_proj", "o_proj"}] * 2
        mixers[3] = {"q_proj", "o_proj"}
    assert kinds == set().union(*mixers) | mlp
    layers = len(mixers)
    assert len(names) == sum(map(len, mixers)) + layers * len(mlp) and all("language_model" in n for n in names)
    trainable = [n for n, p in plain.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with_vision = apply_lora(load_base_model(model_section(path, family)), LoraSection(r=4, vision=True), family)
    vision = [n for n, _ in with_vision.named_parameters() if "lora_A" in n and VISION_NAMES[family] in n]
    # qkv proj fc1 fc2 | + gate up down | q k v out fc1 fc2 (CLIP, SigLIP) | qkv proj linear_fc1 linear_fc2 |
    # q k v projection fc1 fc2 | q k v o gate up down (Gemma 4)
    per_block = {"qwen2_vl": 4, "qwen2_5_vl": 5, "llava": 6, "qwen3_vl": 4, "qwen3_vl_moe": 4, "internvl": 6,
                 "gemma3": 6, "gemma4": 7, "qwen3_5": 4, "qwen3_5_moe": 4}[family]  # fmt: skip
    assert len(vision) == 2 * per_block


def test_full_fine_tuning_trains_the_projector_not_the_tower(folder):
    family, path = folder
    model = load_base_model(model_section(path, family))
    freeze_vision(model, keep_resampler=True, family=family)
    names = [name for name, _ in model.named_parameters()]
    assert all(any(name.startswith(prefix) for name in names) for prefix in PROJECTORS[family])
    for name, param in model.named_parameters():
        if name.startswith(PROJECTORS[family]):
            assert param.requires_grad, name
        elif name.startswith(VISION_NAMES[family]):
            assert not param.requires_grad, name
    assert any(p.requires_grad for n, p in model.named_parameters() if "language_model" in n)


def test_tokenization_cache_key_follows_the_codec(folder):
    from silkie.data.formatting import cache_key
    from silkie.models.loading import load_tokenizer

    family, path = folder
    codec = load_tokenizer(model_section(path, family))
    record = {"prompt_id": "p", "prompt": "Q", "image": "i", "chosen": "a", "rejected": "b",
              "chosen_score": 1.0, "rejected_score": 0.0}  # fmt: skip
    key = cache_key([record], codec, 64, "drop")
    assert key == cache_key([record], codec, 64, "drop") != cache_key([record], codec, 65, "drop")
    template = codec.processor.chat_template
    codec.processor.chat_template = template + " "
    try:
        assert cache_key([record], codec, 64, "drop") != key
    finally:
        codec.processor.chat_template = template  # the processor is cached per folder: leave it as found
    # the image token bound decides which pairs max_length drops
    if family == "internvl":  # one tile: its 16 context tokens between <img> and </img>
        bounded = load_tokenizer(ModelSection(path=str(path), family=family, max_tiles=1))
        assert codec.image_token_budget == 5 * 16 + 2  # at most 4 tiles + the thumbnail
        assert bounded.image_token_budget == 18 and cache_key([record], bounded, 64, "drop") != key
    elif family not in ("llava", "gemma3", "gemma4"):  # fixed-size images; Gemma 4: its processor's token bound
        side = 2 * 2 * codec.processor.image_processor.patch_size  # 2x2 merged tokens (merge size 2)
        bounded = load_tokenizer(ModelSection(path=str(path), family=family, max_pixels=side * side))
        assert bounded.image_token_budget == 4 and cache_key([record], bounded, 64, "drop") != key


def test_the_codec_and_the_image_processor_share_one_processor(folder):
    """One processor per folder and bounds (loading it twice per run costs a tokenizer load and cache room)."""
    from silkie.models.loading import load_tokenizer

    family, path = folder
    section = model_section(path, family)
    codec = load_tokenizer(section)
    images = get_family(family).image_processor(load_base_model(section).config, section)
    assert images.image_processor is codec.processor.image_processor


def test_an_answer_template_without_a_stop_token_gets_eos(folder):
    """llava-hf's template ends the assistant turn with a space: the codec appends EOS so the stop is learned."""
    from silkie.models.loading import load_tokenizer

    family, path = folder
    codec = load_tokenizer(model_section(path, family))
    eos = codec.tokenizer.eos_token_id
    # Gemma 3 (4) closes a turn with <end_of_turn> (<turn|>), a stop of its generation config; its tokenizer's EOS is
    # <eos>
    assert codec.answer_ids("Red.").count(eos) == (0 if family in ("gemma3", "gemma4") else 1)
    template = codec.processor.chat_template
    codec.processor.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'][-1]['text'] }} "
        "{% else %}ASSISTANT: {{ m['content'][-1]['text'] }} {% endif %}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    try:
        ids = codec.answer_ids("Red.")
    finally:
        codec.processor.chat_template = template
    assert ids[-1] == eos and ids.count(eos) == 1


def test_a_turn_closed_by_the_template_s_own_token_gets_no_eos(folder, monkeypatch):
    """InternVL2.5's Llama-variant tokenizers say eos </s> while the template closes turns with <|im_end|>: the
    answer ends at the template's token (where generation stops too), with no </s> after it."""
    from silkie.models.loading import load_tokenizer

    family, path = folder
    codec = load_tokenizer(model_section(path, family))
    if family == "llava":
        pytest.skip("llava-hf's template closes the assistant turn with eos itself")
    closing = codec.answer_ids("Red.")
    other = next(i for i in codec.tokenizer.all_special_ids if i not in closing)
    monkeypatch.setattr(codec.tokenizer, "eos_token", codec.tokenizer.convert_ids_to_tokens(other))  # undone after
    assert codec.tokenizer.eos_token_id == other and codec.answer_ids("Red.") == closing


def test_an_image_budget_over_max_length_is_refused_before_training(tmp_path):
    from silkie.config import load_recipe
    from silkie.train import run_training

    from .conftest import REPO_ROOT

    path = BUILDERS["qwen2_vl"](tmp_path / "m")
    overrides = [f"model.path={path}", "model.max_pixels=12845056", "data.path=none.jsonl", "training.report_to=none"]
    recipe = load_recipe(REPO_ROOT / "dpo_config" / "demo_qwen2_vl.yaml", overrides)
    with pytest.raises(ValueError, match=r"model.max_pixels: one image may take 16384 tokens.*dpo.max_length = 512"):
        run_training(recipe, tmp_path / "run")


def test_an_image_the_processor_cannot_take_drops_its_pair(folder):
    """Qwen2-VL refuses aspect ratios over 200: the pair is dropped (and replaced), the run goes on."""
    from PIL import Image

    from silkie.data.collator import DroppedPairWarning, PairCollator
    from silkie.models.loading import load_base_model, load_tokenizer

    from .hf_fixtures import MemoryImages, tokenized_rows

    family, path = folder
    if family in ("llava", "internvl", "gemma3", "gemma4"):
        pytest.skip("CLIP and SigLIP (Gemma 3) resize any aspect ratio; InternVL tiles it; Gemma 4 fits it in patches")
    section = model_section(path, family)
    codec = load_tokenizer(section)
    store = MemoryImages()
    store.images["img0"] = Image.new("RGB", (2000, 5))
    images = get_family(family).image_processor(load_base_model(section).config, section)
    with pytest.warns(DroppedPairWarning, match="p0.*aspect ratio 2000x5"):
        batch = PairCollator(store, images, codec.pad_token_id)(tokenized_rows(codec))
    # 4 rows still: the refused picture is replaced by a blank one and its pair weighted 0
    assert batch["prompt_input_ids"].size(0) == 4 and batch["image_grid_thw"].size(0) == 3
    assert batch["pair_weight"].tolist() == [0.0, 1.0, 1.0, 1.0] and batch["image_counts"].sum() == 3


def test_a_checkpoint_with_missing_weights_is_refused(folder, tmp_path):
    """transformers only logs weights it had to initialise at random; training or merging on them is refused."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from silkie.models.qwen_vl.checkpoint_io import CheckpointError

    family, path = folder
    partial = tmp_path / "partial"
    shutil.copytree(path, partial)
    (weights,) = partial.glob("*.safetensors")
    state = load_file(weights)
    dropped = sorted(name for name in state if "layers.0.mlp" in name and ".experts." not in name)[0]
    experts = sorted(name for name in state if "layers.0.mlp.experts.0." in name)  # the releases' per-expert tensors
    del state[dropped]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="1 weights missing from the checkpoint"):
        get_family(family).load_model(model_section(partial, family), torch.float32)
    if experts:  # Qwen3.5 MoE: an expert's tensor missing stacks the layer's experts one short
        state[dropped] = load_file(path / weights.name)[dropped]
        del state[experts[0]]
        save_file(state, weights, metadata={"format": "pt"})
        with pytest.raises(CheckpointError, match=r"1 weights of another shape .*: .*layers\.0\.mlp\.experts\."):
            get_family(family).load_model(model_section(partial, family), torch.float32)


def test_checkpoint_of_another_family_and_hub_ids(tmp_path, monkeypatch):
    """qwen_vl refuses another family's checkpoint by model_type (it used to ask for qwen.tiktoken); a hub id is
    resolved to its snapshot in the hub cache (offline here), and an uncached one is a one-line InputError."""
    import shutil

    from silkie.dev.tiny_hf_vlm import build_tiny_qwen2_vl
    from silkie.dev.tiny_qwen_vl import build_tiny_checkpoint
    from silkie.errors import InputError
    from silkie.models.family import get_family
    from silkie.models.loading import local_checkpoint

    qwen2 = build_tiny_qwen2_vl(tmp_path / "qwen2")
    with pytest.raises(
        InputError,
        match=r"holds a .qwen2_vl. checkpoint \(config.json model_type\), not a qwen_vl one; set model.family=qwen2_vl",
    ):
        get_family("qwen_vl").load_codec(ModelSection(path=str(qwen2)))
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-qwen-vl" / "snapshots" / "0123abcd"
    build_tiny_checkpoint(tmp_path / "tiny")
    shutil.copytree(tmp_path / "tiny", snapshot)
    (cache / "models--someone--tiny-qwen-vl" / "refs").mkdir()
    (cache / "models--someone--tiny-qwen-vl" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    assert local_checkpoint("someone/tiny-qwen-vl") == str(snapshot)
    assert local_checkpoint(str(qwen2)) == str(qwen2)
    with pytest.raises(InputError, match=r"model.path: someone/absent is no local folder and the model hub cannot"):
        local_checkpoint("someone/absent")


def test_the_blank_tower_pass_reaches_every_projector(folder):
    """Ranks without images run the tower on a blank one (ZeRO-3 gathers, gradient reductions in step): every
    projector must take part, Qwen3-VL's DeepStack mergers included, or the ranks would disagree."""
    family, path = folder
    model = load_base_model(model_section(path, family))
    get_family(family).blank_image_features(model).sum().backward()
    projectors = [(n, p) for n, p in model.named_parameters() if n.startswith(PROJECTORS[family])]
    assert projectors and all(p.grad is not None for _, p in projectors)  # in the graph (a blank image: some are 0)


def released_layout(folder, target, processor_class: str, image_processor_type: str | None = None):
    """`folder` rewritten as the hub releases lay it out: preprocessor_config.json and video_preprocessor_config.json
    (instead of one processor_config.json), and the official processor class named in them and the tokenizer's."""
    import json
    import shutil

    shutil.copytree(folder, target)
    combined = json.loads((target / "processor_config.json").read_text())
    rest = {k: v for k, v in combined.items() if k not in ("image_processor", "video_processor", "processor_class")}
    if rest:  # the processor's own settings (InternVL's image_seq_length) stay in processor_config.json
        (target / "processor_config.json").write_text(json.dumps({**rest, "processor_class": processor_class}))
    else:
        (target / "processor_config.json").unlink()
    parts = {"preprocessor_config.json": "image_processor", "video_preprocessor_config.json": "video_processor"}
    for name, part in parts.items():
        (target / name).write_text(json.dumps({**combined[part], "processor_class": processor_class}))
    if image_processor_type:  # the releases name the torchvision ("Fast") class
        image = json.loads((target / "preprocessor_config.json").read_text())
        image["image_processor_type"] = image_processor_type
        (target / "preprocessor_config.json").write_text(json.dumps(image))
    tokenizer = json.loads((target / "tokenizer_config.json").read_text())
    (target / "tokenizer_config.json").write_text(json.dumps({**tokenizer, "processor_class": processor_class}))
    return target


@pytest.mark.skipif(is_torchvision_available(), reason="the image-only processors stand in where torchvision is not")
@pytest.mark.parametrize(
    ("family", "processor_class", "image_type", "bound", "budget"),
    [
        ("qwen2_vl", "Qwen2VLProcessor", None, {"max_pixels": 200704}, 256),  # 448x448 px: 28 px per token
        ("qwen3_vl", "Qwen3VLProcessor", None, {"max_pixels": 200704}, 196),  # 32 px per token
        ("internvl", "InternVLProcessor", "GotOcr2ImageProcessorFast", {"max_tiles": 6}, 7 * 16 + 2),  # + thumbnail
        ("gemma4", "Gemma4Processor", "Gemma4ImageProcessor", {}, 70),
    ],
)
def test_a_released_folder_loads_without_torchvision(family, processor_class, image_type, bound, budget, tmp_path):
    """A released folder names its official processor, whose video half needs torchvision: Silkie loads the image-only
    one by the folder's model type instead (AutoProcessor alone fails here)."""
    from transformers import AutoProcessor

    from silkie.models.loading import load_tokenizer

    folder = released_layout(BUILDERS[family](tmp_path / "tiny"), tmp_path / "released", processor_class, image_type)
    with pytest.raises((ImportError, ValueError), match="orchvision"):
        AutoProcessor.from_pretrained(folder)
    codec = load_tokenizer(ModelSection(path=str(folder), family=family, **bound))
    assert type(codec.processor).__name__ == f"ImageOnly{processor_class}"
    assert codec.image_token_budget == budget
    assert codec.prompt_ids("Q", ["a"]).count(codec.image_marker_id) == 1


def test_the_processor_saved_beside_an_adapter_loads_again(folder, tmp_path, monkeypatch):
    """Tools read the tokenizer and processor from a run's adapter folder, which has no config.json; the image-only
    processor it names loads by class where torchvision is installed too (AutoProcessor would give the tokenizer)."""
    from silkie.models.hf_vlm import processors
    from silkie.models.loading import load_tokenizer

    family, path = folder
    codec = load_tokenizer(model_section(path, family))
    codec.save_pretrained(str(tmp_path / "adapter"))
    again = get_family(family).load_codec(model_section(path, family), files=str(tmp_path / "adapter"))
    assert type(again.processor) is type(codec.processor)
    assert again.prompt_ids("Q", ["a"]) == codec.prompt_ids("Q", ["a"])
    assert again.answer_ids("A.") == codec.answer_ids("A.")
    monkeypatch.setattr(processors, "is_torchvision_available", lambda: True)
    loaded = processors.load_image_only_processor(str(tmp_path / "adapter"))
    if type(codec.processor).__name__.startswith("ImageOnly"):  # the Qwen families without torchvision
        assert type(loaded) is type(codec.processor)
    else:
        assert loaded is None
