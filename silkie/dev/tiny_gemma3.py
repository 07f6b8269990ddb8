"""A tiny random Gemma 3 folder in the layout of google/gemma-3-*-it (a stand-in for tests and the demo).

A Gemma-style tokenizer trained offline: BPE with byte fallback, `<pad> <eos> <bos> <unk> <mask>` at ids 0-4 as in
the releases, then the byte pieces and the learned ones, then the chat and image tokens and the newline runs the
releases keep as added (non-special) tokens, so "\\n" runs tokenize as one token wherever they meet; a 2-layer,
32-wide SigLIP (112 px, 14 px patches: 64 patches average-pooled to 16 tokens) and a 2-layer, 64-wide Gemma 3
language model with one sliding-window layer (a window of 16 positions, shorter than a prompt) and one full-attention
layer; the PIL image processor at Gemma's normalisation and the releases' chat template.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    AutoTokenizer,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Gemma3TextConfig,
    GemmaTokenizer,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
)
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

from silkie.dev.tiny_hf_vlm import (
    INIT_STD,
    TINY_TEXT,
    TINY_VIT,
    padded_vocab_size,
    save_tiny_model,
    tokenizer_corpus,
    train_bpe,
)

GEMMA_CORE_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")  # ids 0-4, as in the releases
GEMMA3_CHAT_TOKENS = ("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>")
GEMMA3_MEDIA_TOKENS = {  # the tokenizer's named tokens Gemma3Processor reads
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "image_token": "<image_soft_token>",
}
NEWLINE_RUNS = tuple("\n" * count for count in range(1, 9))  # added tokens of the releases (ids 107.. there)
# google/gemma-3-4b-it's chat template: a system message opens the first user turn; text parts are trimmed
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n"
)
GEMMA3_IMAGE_SIZE = 112  # (112 / 14)^2 = 64 patches, pooled 2x2 to 16 tokens
GEMMA3_IMAGE_TOKENS = 16
GEMMA3_SLIDING_WINDOW = 16


def train_gemma_tokenizer(
    vocab_size: int = 1024, chat_tokens: Sequence[str] = GEMMA3_CHAT_TOKENS, scaffolding: Sequence[str] = ()
) -> GemmaTokenizer:
    """Gemma's layout: the core tokens, the 256 byte-fallback pieces, the learned pieces (also from the template's
    `scaffolding` texts), then the chat and image tokens `chat_tokens` (special) and the newline runs (added, not
    special)."""
    corpus = [*tokenizer_corpus(), "user\n", "model\n", "\n\n\n\n", *scaffolding]
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    learned, merges = train_bpe(corpus, vocab_size, backend, special_tokens=list(GEMMA_CORE_TOKENS))
    pieces = list(GEMMA_CORE_TOKENS) + [f"<0x{byte:02X}>" for byte in range(256)]
    pieces += [piece for piece, _ in sorted(learned.items(), key=lambda item: item[1]) if piece not in pieces]
    vocab = {piece: index for index, piece in enumerate(pieces)}
    tokenizer = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)  # as the releases: text gets <bos>
    tokenizer.add_special_tokens({"additional_special_tokens": list(chat_tokens)})
    tokenizer.add_tokens([AddedToken(run, normalized=False, special=False) for run in NEWLINE_RUNS])
    return tokenizer


def tiny_gemma3_config(tokenizer: PreTrainedTokenizerFast) -> Gemma3Config:
    """Gemma 3 with a 2-layer, 32-wide SigLIP (112 px) and a 2-layer, 64-wide text model (sliding, full)."""
    text = Gemma3TextConfig(
        **TINY_TEXT,
        vocab_size=padded_vocab_size(tokenizer),
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=GEMMA3_SLIDING_WINDOW,
        layer_types=["sliding_attention", "full_attention"],
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    # no attention-pooling head, as the releases (Gemma 3 reads the last hidden states)
    vision = SiglipVisionConfig(**{**TINY_VIT, "image_size": GEMMA3_IMAGE_SIZE}, vision_use_head=False)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in GEMMA3_MEDIA_TOKENS.items()}
    return Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=GEMMA3_IMAGE_TOKENS,
        boi_token_id=ids["boi_token"],
        eoi_token_id=ids["eoi_token"],
        image_token_id=ids["image_token"],
        initializer_range=INIT_STD,
    )


def _informative_image_path(model: Gemma3ForConditionalGeneration) -> None:
    """Gemma 3 initialises its image projection to zeros (every image would read as no image at all), and SigLIP its
    patch embedding at LeCun scale (at 32 wide, images would differ little next to the position embeddings): the
    projection at unit gain, the patch embedding at the CLIP stand-ins' INIT_STD."""
    projector = model.model.multi_modal_projector
    projector.mm_input_projection_weight.normal_(std=projector.mm_input_projection_weight.size(0) ** -0.5)
    model.model.vision_tower.embeddings.patch_embedding.weight.normal_(std=INIT_STD)


def build_tiny_gemma3(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Gemma 3 folder: model, tokenizer (with its image tokens), PIL image processor, processor
    and chat template."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_gemma_tokenizer().save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out, extra_special_tokens=GEMMA3_MEDIA_TOKENS)
    config = tiny_gemma3_config(tokenizer)
    eos = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")]  # as the releases' generation
    save_tiny_model(Gemma3ForConditionalGeneration, config, out, seed, eos, init=_informative_image_path)
    image_processor = Gemma3ImageProcessorPil(
        size={"height": GEMMA3_IMAGE_SIZE, "width": GEMMA3_IMAGE_SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor = Gemma3Processor(
        image_processor, tokenizer, chat_template=GEMMA3_CHAT_TEMPLATE, image_seq_length=GEMMA3_IMAGE_TOKENS
    )
    processor.save_pretrained(out)
    return out
