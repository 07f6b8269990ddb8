"""What Gemma 3 and Gemma 4 share: the image attended both ways at generation, chat prompts as the processor makes
them, generation's stops at the end of a turn, and the recipe and folder refusals."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig

from silkie.config import ModelSection
from silkie.errors import RecipeError
from silkie.models.loading import load_base_model, load_tokenizer

from .hf_fixtures import BUILDERS, family_batch, pair_image

# family -> (the token types `generate` takes, the template's end of turn, the image tensors)
GEMMAS = {
    "gemma3": ("token_type_ids", "<end_of_turn>", ("pixel_values",)),
    "gemma4": ("mm_token_type_ids", "<turn|>", ("pixel_values", "image_position_ids")),
}


@pytest.fixture(scope="module", params=sorted(GEMMAS))
def gemma(request, tmp_path_factory):
    family = request.param
    return family, BUILDERS[family](tmp_path_factory.mktemp(family) / f"tiny-{family}")


def section(family: str, folder) -> ModelSection:
    return ModelSection(path=str(folder), family=family, dtype="fp32")


def test_chat_inputs_are_the_processor_s_with_token_types(gemma, tmp_path):
    """`silkie chat` / `evaluate` / `annotate` build a prompt as training does: the processor's ids for the whole
    generation prompt (Gemma 4's empty thought channel too), its image tensors and the token types `generate` needs
    to attend the image both ways."""
    from silkie.tools.chat_inputs import family_inputs

    family, folder = gemma
    token_types, _, image_names = GEMMAS[family]
    config = AutoConfig.from_pretrained(folder)
    picture = tmp_path / "p.png"
    pair_image(3, (90, 60)).save(picture)
    _, ids, tensors = family_inputs(folder, None, config, [str(picture)], [], "What is <image> showing?")
    processor = load_tokenizer(section(family, folder)).processor
    parts = [{"type": "text", "text": "What is "}, {"type": "image"}, {"type": "text", "text": " showing?"}]
    text = processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True,
                                         tokenize=False)  # fmt: skip
    reference = processor(images=[pair_image(3, (90, 60))], text=[text], return_tensors="pt", add_special_tokens=False)
    assert torch.equal(ids, reference["input_ids"])
    for name in (token_types, *image_names):
        assert torch.equal(tensors[name], reference[name])


def test_generation_stops_at_the_end_of_turn_and_sees_the_image_both_ways(gemma):
    """The tokenizer's EOS is `<eos>`; a turn ends with the template's own token, which the model's generation config
    names: `generate` stops at both. Prompts for `generate` carry the token types, so the prefill attends an image
    both ways as training does (Gemma 4: in its sliding-window layers)."""
    from silkie.models.generation import prompt_generation_inputs, stop_token_ids

    family, folder = gemma
    token_types, end_of_turn, image_names = GEMMAS[family]
    model = load_base_model(section(family, folder))
    codec = load_tokenizer(section(family, folder))
    end = codec.tokenizer.convert_tokens_to_ids(end_of_turn)
    assert stop_token_ids(codec.tokenizer, model) == [codec.tokenizer.eos_token_id, end]
    assert stop_token_ids(codec.tokenizer) == [codec.tokenizer.eos_token_id]
    batch, _ = family_batch(folder, family, model)
    inputs = prompt_generation_inputs(model, batch, 0)
    assert set(inputs) >= set(image_names)
    assert torch.equal(inputs[token_types], (inputs["input_ids"] == model.config.image_token_id).long())
    with torch.no_grad():
        both_ways = model(**inputs).logits[0, -1]
        causal = model(**{k: v for k, v in inputs.items() if k != token_types}).logits[0, -1]
        out = model.generate(**inputs, max_new_tokens=1, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)  # fmt: skip
    assert (both_ways - causal).abs().max() > 1e-3  # the prefill's first logits are the both-ways forward's
    torch.testing.assert_close(out.logits[0][0], both_ways, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("model_type", "family", "named"),
    [
        ("gemma3_text", "gemma3", ("text-only Gemma 3", "gemma-3-4b-it")),
        ("gemma4_unified", "gemma4", ("Gemma 4 12B", "E2B, E4B, 31B and 26B-A4B")),
    ],
)
def test_a_folder_of_another_gemma_is_refused_naming_the_ones_that_load(model_type, family, named, tmp_path):
    from silkie.config.checkpoint import checkpoint_problem

    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    problem = checkpoint_problem(tmp_path, family)
    assert f"'{model_type}'" in problem and all(text in problem for text in named)


@pytest.mark.parametrize("family", sorted(GEMMAS))
def test_fp16_is_refused_in_the_recipe(family):
    """Gemma's activations overflow fp16's range: a recipe asking for it is refused before anything loads."""
    with pytest.raises(RecipeError, match=f"auto, bf16 or fp32 for family {family}"):
        ModelSection(path="m", family=family, dtype="fp16").check()
    ModelSection(path="m", family=family, dtype="bf16").check()
