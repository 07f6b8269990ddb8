"""Qwen3.5 (dense, MoE): packed rows through its linear-attention layers, its prompt and answer text, generation and
liger's patch. The battery of every transformers family (hf_fixtures' HF_FAMILIES: the efficient step equal to the
plain path, TRL's DPOTrainer, video, varlen, training) runs on its stand-ins too."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from silkie.dpo.batching import packed_rows
from silkie.models.family import get_family
from silkie.models.hf_vlm.linear_attention import RecurrentRows, recurrent_rows
from silkie.models.loading import load_base_model, load_tokenizer

from .hf_fixtures import BUILDERS, OPTION_SETS, PLAIN, family_batch, lora_model, media_batch, model_section, run_step


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return BUILDERS["qwen3_5"](tmp_path_factory.mktemp("qwen3_5"))


def test_recurrent_rows_index_each_prompt_and_answer_and_what_each_token_follows():
    # one row of two pairs (prompt | chosen | rejected each), then padding; a second row of one pair
    owner = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, -1], [2, 2, 2, 2, -1, -1, -1, -1, -1, -1, -1, -1, -1]])
    segment = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 0, 0, 1, 2, -1], [0, 1, 2, 2, -1, -1, -1, -1, -1, -1, -1, -1, -1]])
    rows = recurrent_rows(owner, segment)
    assert rows.prompts.tolist() == [[0, 1, 2], [8, 9, -1], [13, -1, -1]]
    assert rows.answers.tolist() == [[3, 4, -1], [10, -1, -1], [14, -1, -1], [5, 6, 7], [11, -1, -1], [15, 16, -1]]
    assert rows.answers.size(0) == 2 * rows.prompts.size(0)  # answer i continues prompt i mod B (chosen, rejected)
    previous = rows.taps[0].view(2, -1).tolist()  # one step back
    # a prompt starts from nothing; each answer's first token follows its prompt's last (the rejected one too)
    assert previous[0] == [-1, 0, 1, 2, 3, 2, 5, 6, -1, 8, 9, 9, -1]
    assert previous[1][:5] == [-1, 13, 13, 15, -1]
    taps = recurrent_rows(owner, segment, conv_width=3).taps.view(2, 2, -1)  # 1 and 2 steps back in its sequence
    assert taps[0, 0].tolist() == previous[0] and taps[1, 0].tolist() == [-1, -1, 0, 1, 2, 1, 2, 5, -1, -1, 8, 8, -1]


def test_packed_rows_take_the_block_mask_and_the_recurrent_layers_their_sequences(folder):
    model = load_base_model(model_section(folder, "qwen3_5"))
    family = get_family("qwen3_5")
    batch, pad = family_batch(folder, "qwen3_5", model)
    rows = packed_rows(batch, pad, family.prompt_positions(model, batch), pairs_per_row=2)
    mask = rows.attention_mask_on()
    masks = family.attention_masks(model, mask, rows.input_ids, rows.position_ids, rows.packed_segments())
    assert masks["full_attention"] is mask and isinstance(masks["linear_attention"], RecurrentRows)
    assert masks["linear_attention"].prompts.size(0) == batch["prompt_input_ids"].size(0)
    padding = batch["prompt_attention_mask"]  # concatenated rows: the padding mask, from which the model builds both
    assert family.attention_masks(model, padding, batch["prompt_input_ids"], None) is padding


def _fp64_gated_delta_rule(query, key, value, g, beta, initial_state=None, output_final_state=False,
                           use_qk_l2norm_in_kernel=False, **_):  # fmt: skip
    """The gated delta rule token by token in fp64 (transformers' kernels compute in fp32 whatever the input)."""
    repeat = value.size(2) // key.size(2)
    query, key = query.repeat_interleave(repeat, 2), key.repeat_interleave(repeat, 2)
    query, key, value, beta, g = (x.transpose(1, 2).double() for x in (query, key, value, beta, g))
    if use_qk_l2norm_in_kernel:
        query = query * torch.rsqrt((query * query).sum(-1, keepdim=True) + 1e-6)
        key = key * torch.rsqrt((key * key).sum(-1, keepdim=True) + 1e-6)
    query = query / query.size(-1) ** 0.5
    state = query.new_zeros(*key.shape[:2], key.size(-1), value.size(-1)) if initial_state is None else initial_state
    out = []
    for t in range(key.size(2)):
        state = state * g[:, :, t].exp()[..., None, None]
        delta = (value[:, :, t] - (state * key[:, :, t, :, None]).sum(-2)) * beta[:, :, t, None]
        state = state + key[:, :, t, :, None] * delta[:, :, None, :]
        out.append((state * query[:, :, t, :, None]).sum(-2))
    return torch.stack(out, 2).transpose(1, 2).to(value.dtype), state if output_final_state else None


@pytest.mark.parametrize("name", ["share_prompt", "three_pairs_per_row"])
def test_packed_rows_equal_the_plain_path_to_fp64_rounding(folder, monkeypatch, name):
    """Images, several per pair, and videos: each answer continues from its prompt's recurrent and convolution
    state exactly as in its own row. In fp32 the two paths differ by the kernel's chunking (test_hf_vlm_step
    allows for it); with the rule in fp64 they agree to rounding (answers from a zero state, or the rejected answer
    after the chosen one, or a first answer token that does not read the prompt's last inputs: > 1e-2)."""
    from transformers.models.qwen3_5 import modeling_qwen3_5

    monkeypatch.setattr(modeling_qwen3_5, "torch_chunk_gated_delta_rule", _fp64_gated_delta_rule)
    model = lora_model(folder, "qwen3_5").double()
    batch, pad = media_batch(folder, "qwen3_5", model)
    batch = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
    plain, fast = run_step(model, batch, PLAIN, pad), run_step(model, batch, OPTION_SETS[name], pad)
    for scores in (0, 1):  # the log-probs come out of an fp32 log-softmax: equal to fp32 rounding
        for kind in ("chosen_logps", "rejected_logps"):
            torch.testing.assert_close(getattr(fast[scores], kind), getattr(plain[scores], kind), atol=2e-5, rtol=0)
    assert plain[3] and set(fast[3]) == set(plain[3])
    for param, grad in plain[3].items():
        torch.testing.assert_close(fast[3][param], grad, atol=1e-7, rtol=0)
    assert (plain[0].chosen_logps - plain[1].chosen_logps).abs().max() > 1e-2  # the adapter matters


def test_prompts_end_in_the_open_think_block_and_answers_close_it(folder):
    """Qwen3.5's generation prompt opens `<think>`; its rendered answer closes an empty one first: as TRL splits
    them (the prompt ends where the two renderings part), the answer learns to close it. Generation keeps the whole
    generation prompt."""
    from trl.data_utils import apply_chat_template

    from silkie.data.formatting import encode_pair

    codec = load_tokenizer(model_section(folder, "qwen3_5"))
    ids, reason = encode_pair("<image>Which colour?", ["a.jpg"], "Red.", "Blue.", codec)
    decode = codec.tokenizer.decode
    assert reason is None
    assert decode(ids["prompt_input_ids"]).endswith("<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert decode(ids["chosen_input_ids"]) == "\n</think>\n\nRed.<|im_end|>\n"
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which colour?"}]}
    example = {"prompt": [user], "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "Red."}]}],
               "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}]}  # fmt: skip
    trl = apply_chat_template(example, codec.processor)
    assert decode(ids["prompt_input_ids"]) == trl["prompt"] and decode(ids["rejected_input_ids"]) == trl["rejected"]
    assert decode(codec.prompt_ids("Q", [], generation=True)).endswith("<|im_start|>assistant\n<think>\n")


def test_a_left_padded_batch_generates_as_each_prompt_alone(folder):
    """Generation runs the layers' own recurrent path with a cache; left padding must not reach the state."""
    model = load_base_model(model_section(folder, "qwen3_5")).eval()
    codec = load_tokenizer(model_section(folder, "qwen3_5"))
    prompts = [codec.prompt_ids(text, [], generation=True) for text in ("Q", "Describe the shapes in the picture.")]
    width = max(map(len, prompts))
    ids = torch.tensor([[codec.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=codec.pad_token_id)
    together = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, width:]
    for row, prompt in enumerate(prompts):
        alone = model.generate(input_ids=torch.tensor([prompt]), **kwargs)[0, len(prompt):]
        assert together[row].tolist() == alone.tolist()


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe"])
def test_liger_patches_qwen3_5_without_its_rotary_kernel(family, tmp_path, monkeypatch):
    """liger-kernel's Qwen3.5 patches raise NotImplementedError on rope=True (no rotary kernel for the hybrid
    layers): Silkie asks for norms and MLPs only, and none of liger's loss heads (our log-probs are computed
    outside)."""
    from silkie.models.kernels import LIGER_PATCHES, use_liger

    calls = []
    fake = types.ModuleType("liger_kernel.transformers")
    setattr(fake, LIGER_PATCHES[family], lambda **kwargs: calls.append(kwargs))
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    assert use_liger(load_base_model(model_section(BUILDERS[family](tmp_path), family)), family) == 2
    assert calls[0]["rope"] is False and calls[0]["rms_norm"] and calls[0]["swiglu"]
    assert not calls[0]["fused_linear_cross_entropy"] and not calls[0]["cross_entropy"]


def test_the_adapter_s_first_weights_follow_the_seed_not_the_load(folder):
    """Under ZeRO-3 transformers builds Qwen3.5's linear-attention layers on the device, drawing random numbers a
    plain load does not: the policy is seeded after the load, so ZeRO-3 and DDP runs start from the same adapter."""
    from silkie.config import LoraSection
    from silkie.models.loading import build_policy

    def lora_a(seed: int | None, drawn_before: int) -> torch.Tensor:
        torch.manual_seed(drawn_before)  # what the load leaves of the generator's state
        model = build_policy(model_section(folder, "qwen3_5"), LoraSection(r=4), seed=seed)
        return next(p for n, p in model.named_parameters() if "lora_A" in n).detach().clone()

    torch.testing.assert_close(lora_a(7, drawn_before=1), lora_a(7, drawn_before=2), atol=0, rtol=0)
    assert not torch.equal(lora_a(None, drawn_before=1), lora_a(None, drawn_before=2))


def test_a_model_loaded_by_transformers_directly_takes_packed_rows(folder, monkeypatch):
    """Tools and users may load a folder with transformers' Auto classes, not the family's `load_model`: the first
    packed rows switch its linear-attention layers over."""
    from transformers import AutoModelForImageTextToText
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

    from silkie.dpo.step import StepOptions, score_answers

    own = getattr(Qwen3_5GatedDeltaNet.forward, "__wrapped__", Qwen3_5GatedDeltaNet.forward)
    monkeypatch.setattr(Qwen3_5GatedDeltaNet, "forward", own)  # as in a process that never ran `load_model`
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    batch, pad = family_batch(folder, "qwen3_5", model)
    with torch.no_grad():
        packed = score_answers(model, batch, StepOptions(pairs_per_row=2), pad, no_grad=True)
        plain = score_answers(model, batch, PLAIN, pad, no_grad=True)
    torch.testing.assert_close(packed.chosen_logps, plain.chosen_logps, atol=1e-4, rtol=0)
    torch.testing.assert_close(packed.rejected_logps, plain.rejected_logps, atol=1e-4, rtol=0)


def test_chat_template_kwargs_turn_thinking_off_as_trl_does(folder):
    """`model.chat_template_kwargs: {enable_thinking: false}` renders every prompt with Qwen3.5's empty think block
    closed, so an answer is its text alone; the ids equal TRL's with the row's `chat_template_kwargs`, and the
    tokenization cache tells the two apart."""
    import dataclasses

    from trl.data_utils import apply_chat_template

    from silkie.data.formatting import encode_pair

    off = {"enable_thinking": False}
    section = dataclasses.replace(model_section(folder, "qwen3_5"), chat_template_kwargs=off)
    section.check()
    codec = load_tokenizer(section)
    ids, reason = encode_pair("<image>Which colour?", ["a.jpg"], "Red.", "Blue.", codec)
    decode = codec.tokenizer.decode
    assert reason is None and decode(ids["chosen_input_ids"]) == "Red.<|im_end|>\n"
    assert decode(ids["prompt_input_ids"]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which colour?"}]}
    example = {"prompt": [user], "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "Red."}]}],
               "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}],
               "chat_template_kwargs": off}  # fmt: skip
    trl = apply_chat_template(example, codec.processor)
    assert decode(ids["prompt_input_ids"]) == trl["prompt"] and decode(ids["rejected_input_ids"]) == trl["rejected"]
    assert decode(codec.prompt_ids("Q", [], generation=True)).endswith("<think>\n\n</think>\n\n")
    assert codec.fingerprint() != load_tokenizer(model_section(folder, "qwen3_5")).fingerprint()


def test_chat_template_kwargs_are_checked_in_the_recipe():
    from silkie.config import ModelSection, RecipeError

    for family, kwargs, needle in (
        ("qwen_vl", {"enable_thinking": False}, r"model.chat_template_kwargs = .*null for family qwen_vl"),
        ("qwen3_5", {"enable-thinking": False}, r"model.chat_template_kwargs = .*variable names"),
        ("qwen3_5", {"enable_thinking": [False]}, r"model.chat_template_kwargs.enable_thinking = \[False\]"),
        ("qwen3_5", {"enable_thinking": "no"}, r"model.chat_template_kwargs.enable_thinking = 'no'.*true or false"),
        ("qwen3_5", {"add_generation_prompt": True}, r"add_generation_prompt = True.*Silkie sets it"),
    ):
        with pytest.raises(RecipeError, match=needle):
            ModelSection(path="m", family=family, chat_template_kwargs=kwargs).check()
