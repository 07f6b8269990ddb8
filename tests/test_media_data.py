"""Several images and videos per pair through the data path: limits and drops, prompt placement per family's
codec, and the collator's spans and broken-media handling."""

from __future__ import annotations

import re

import pytest
import torch

from silkie.config import ModelSection, RecipeError, load_recipe
from silkie.config.names import QWEN_HF_FAMILIES, VIDEO_FAMILIES
from silkie.data.collator import DroppedPairWarning, PairCollator, expand_markers
from silkie.data.formatting import encode_pair, format_query
from silkie.data.images import ZipImageStore
from silkie.data.pairs import MediaLimits, pairs_from_preference_rows
from silkie.dev.clips import colour_clip
from silkie.models.loading import load_tokenizer
from silkie.models.media import media_segments
from silkie.models.qwen_vl.image_processing import QWenVLImageProcessor
from silkie.models.qwen_vl.tokenization import QWenTokenizer
from tests.data_fixtures import jpeg_bytes, write_tiny_vocab, write_zip

from .hf_fixtures import BUILDERS, video_side

DEMO = "dpo_config/demo.yaml"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return QWenTokenizer.from_pretrained(write_tiny_vocab(tmp_path_factory.mktemp("vocab")))


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def codec(request, tmp_path_factory):
    folder = BUILDERS[request.param](tmp_path_factory.mktemp(request.param))
    side = video_side(request.param)
    video = {"video_max_pixels": side * side} if request.param in QWEN_HF_FAMILIES else {}
    return request.param, folder, load_tokenizer(ModelSection(path=str(folder), family=request.param, **video))


def row(i, images=(), videos=(), prompt="Q"):
    return {"id": f"r{i}", "prompt": prompt, "chosen": "good", "rejected": "bad", "images": list(images),
            "videos": list(videos)}  # fmt: skip


def test_limits_and_missing_media_are_counted_drops_with_their_first_case(tmp_path):
    store = ZipImageStore(write_zip(tmp_path / "m.zip", {"a.jpg": jpeg_bytes(), "b.jpg": jpeg_bytes(), "v.mkv": b"x"}))
    rows = [
        row(0, ["b.jpg", "a.jpg"], ["v.mkv"]),
        row(1, ["a.jpg", "b.jpg", "a.jpg"]),
        row(2, [], ["v.mkv", "v.mkv"]),
        row(3, ["a.jpg"], ["gone.mkv"]),
        row(4, ["gone.jpg"]),
    ]
    pairs, report = pairs_from_preference_rows(rows, store, limits=MediaLimits(max_images=2, max_videos=1))
    assert [(p.prompt_id, p.images, p.videos) for p in pairs] == [("r0", ("b.jpg", "a.jpg"), ("v.mkv",))]
    assert report.rows_dropped == {"too_many_images": 1, "too_many_videos": 1, "missing_video": 1, "missing_image": 1}
    summary = report.summary()
    assert "too_many_images: 1 (first: r1: 3 images, data.max_images_per_pair=2)" in summary
    assert re.search(r"missing_video: 1 \(first: r3: gone.mkv not in \S*/m.zip, which holds e.g. a.jpg\)", summary)


def test_recipe_keys_bound_media_and_are_checked():
    recipe = load_recipe(DEMO, ["data.max_images_per_pair=3", "data.video_fps=1.5"])
    assert (recipe.data.max_images_per_pair, recipe.data.video_fps, recipe.data.video_max_frames) == (3, 1.5, 64)
    with pytest.raises(RecipeError, match=r"data.video_max_frames = 2 is not allowed; expected an integer >= data"):
        load_recipe(DEMO, ["data.video_max_frames=2"])
    with pytest.raises(RecipeError, match="model.video_max_pixels = 3136 is not allowed; expected null: only qwen2"):
        load_recipe(DEMO, ["model.video_max_pixels=3136"])


def test_markers_place_media_else_they_go_first():
    kinds = [(s.kind, s.value) for s in media_segments("See <image> then <video>.", ["a"], ["v"])]
    assert kinds == [("text", "See "), ("image", "a"), ("text", " then "), ("video", "v"), ("text", ".")]
    assert [s.kind for s in media_segments("Q", ["a", "b"], ["v"])] == ["image", "image", "video", "text"]


def test_qwen_vl_writes_several_pictures_as_the_original(tok):
    items = [{"image": "a.jpg"}, {"image": "b.jpg"}, {"text": "Which is larger?"}]
    assert format_query("Which is larger?", ["a.jpg", "b.jpg"]) == tok.from_list_format(items)
    placed = [{"text": "Is "}, {"image": "a.jpg"}, {"text": "like "}, {"image": "b.jpg"}, {"text": "?"}]
    assert format_query("Is <image>like <image>?", ["a.jpg", "b.jpg"]) == tok.from_list_format(placed)
    ids, reason = encode_pair("Which is larger?", ["a.jpg", "b.jpg"], "The first.", "b", tok)
    assert reason is None and ids["prompt_input_ids"].count(tok.img_start_id) == 2
    assert tok.image_paths(ids["prompt_input_ids"]) == ["a.jpg", "b.jpg"]
    assert encode_pair("<image> and <image>", ["a.jpg"], "a", "b", tok) == (None, "image_marker_mismatch")
    assert encode_pair("Q", ["a.jpg"], "a", "b", tok, videos=["v.mkv"]) == (None, "video_unsupported")


def test_chat_template_codecs_place_media_and_refuse_what_they_cannot(codec):
    family, _, codec = codec
    text = codec.prompt_text("Is <image> like <image>?", ["a", "b"])
    image_tag = codec.processor.image_token
    assert text.count(image_tag) == 2 and "<image>" not in text.replace(image_tag, "")
    ids, reason = encode_pair("<image>\nWhat is this?", ["a"], "A cat.", "A dog.", codec)  # LLaVA-style prompt
    assert reason is None and ids["prompt_input_ids"].count(codec.image_marker_id) == 1
    # LLaVA's image token is the marker itself: a stray one is a marker without an image
    stray = "image_marker_mismatch" if image_tag == "<image>" else "image_tag_in_text"
    assert encode_pair(f"Q {image_tag}", [], "a", "b", codec) == (None, stray)
    # a prompt that was templated already (TRL's string format brings them) would be wrapped a second time
    templated = codec.prompt_text("What is this?", [])
    if family != "llava":  # chatml: <|im_start|> / <|im_end|>; Gemma 3's <start_of_turn> / <end_of_turn>, 4's <turn|>
        assert codec.template_markers and encode_pair(templated, [], "a", "b", codec) == (None, "chat_template_in_text")
        closing = {"gemma3": "<end_of_turn>", "gemma4": "<turn|>"}.get(family, "<|im_end|>")
        assert encode_pair("Q", [], f"A cat.{closing}", "b", codec) == (None, "chat_template_in_text")
    else:  # llava-hf's template writes USER: / ASSISTANT:, no tokens of its own
        assert codec.template_markers == ()
    with_video = encode_pair("Q", [], "a", "b", codec, videos=["v"], video_frames=4)
    if family not in VIDEO_FAMILIES:
        assert with_video == (None, "video_unsupported") and codec.video_token_budget(64) == 0
    else:
        assert with_video[1] is None and with_video[0]["prompt_input_ids"].count(codec.video_marker_id) == 1
        # 32 temporal patches x 4 tokens at 56x56 (Qwen3-VL, Qwen3.5: 64x64, + its span's 2 and the longest
        # `<t seconds>`);
        # InternVL: per frame `Frame{k}: ` (after a newline from the second on) and 16 tokens between <img> / </img>
        stamp = len(codec.tokenizer("<99999.9 seconds>", add_special_tokens=False)["input_ids"])
        if family == "internvl":
            texts = sum(len(codec.tokenizer(f"{chr(10) * (k > 0)}Frame{k + 1}: ")["input_ids"]) for k in range(64))
            assert codec.video_token_budget(64) == texts + 64 * (16 + 2) + 1  # + 1: joined with the text before
        elif family == "gemma4":  # per frame `mm:ss ` (after a space from the second on; the widest written,
            # 999:59), <|image>, 70 tokens, <image|>
            first = len(codec.tokenizer("999:59 ", add_special_tokens=False)["input_ids"])
            later = len(codec.tokenizer("<image|> 999:59 ", add_special_tokens=False)["input_ids"]) - 1
            assert codec.video_token_budget(64) == first + 63 * later + 64 * (70 + 2) + 1
        else:
            timestamped = family.startswith(("qwen3_vl", "qwen3_5"))
            assert codec.video_token_budget(64) == 32 * (4 + (2 + stamp if timestamped else 0))
        assert encode_pair("Q", [], "a", "b", codec, 100, videos=["v"], video_frames=64) == (None, "too_long")
        from silkie.data.formatting import tokenize_pairs
        from silkie.data.pairs import PairReport, PreferencePair

        pairs = [PreferencePair(f"p{i}", "Q", (), "a " * n, "b", 1.0, 0.0, videos=v) for i, (n, v) in
                 enumerate([(1, ()), (1, ("v",)), (90, ()), (90, ("v",))])]  # fmt: skip
        report = PairReport(pairs_kept=4)
        tokenize_pairs(pairs, codec, max_length=100, video_frames=64, report=report)
        assert report.pairs_dropped == {"too_long": 3} and report.too_long_with_video == 2  # the long text: no video


def test_expand_markers_gives_each_span_its_own_count():
    assert expand_markers([1, 9, 2, 9, 3], 9, [2, 3]) == [1, 9, 9, 2, 9, 9, 9, 3]
    assert expand_markers([1, 2], 9, []) == [1, 2]


class Store:
    def __init__(self, images, videos):
        self.images, self.videos = images, videos

    def open(self, key):
        from PIL import Image

        if key not in self.images:
            from silkie.data.images import ImageLoadError

            raise ImageLoadError(key, "missing")
        return Image.new("RGB", (40, 40), self.images[key])

    def read_bytes(self, key):
        return self.videos[key]


def test_a_pair_with_one_broken_image_keeps_its_spans_with_blanks_and_weight_0(tok):
    rows = []
    for prompt_id, images in (("ok", ["red", "blue"]), ("broken", ["red", "gone"])):
        ids, _ = encode_pair("Q", images, "a", "b", tok)
        rows.append({"prompt_id": prompt_id, "images": images, "videos": [], **ids})
    collate = PairCollator(Store({"red": (255, 0, 0), "blue": (0, 0, 255)}, {}), QWenVLImageProcessor(56), 0)
    with pytest.warns(DroppedPairWarning, match="broken.*gone"):
        batch = collate(rows)
    assert batch["image_counts"].tolist() == [2, 2] and batch["pair_weight"].tolist() == [1.0, 0.0]
    pixels = batch["pixel_values"]
    assert pixels.shape == (4, 3, 56, 56)
    assert pixels[0, 0].mean() > pixels[1, 0].mean() and pixels[2:].flatten(2).std(2).max() == 0  # order; blanks


def test_a_broken_video_weights_its_pair_0_and_keeps_its_tokens(codec):
    family, folder, codec = codec
    if family not in VIDEO_FAMILIES:
        pytest.skip("no video")
    from silkie.data.video import VideoSampling
    from silkie.models.family import get_family
    from silkie.models.loading import load_base_model

    side = video_side(family)  # 2x2 merged tokens a frame
    videos = {"good": colour_clip([(255, 0, 0)] * 4, size=(side, side)), "bad": b"not a video"}
    rows = []
    for prompt_id, key in (("good", "good"), ("bad", "bad")):
        ids, _ = encode_pair("Q", [], "a", "b", codec, videos=[key], video_frames=4)
        rows.append({"prompt_id": prompt_id, "images": [], "videos": [key], **ids})
    bounds = {"video_max_pixels": side**2, "video_min_pixels": side**2} if family in QWEN_HF_FAMILIES else {}
    model_section = ModelSection(path=str(folder), family=family, **bounds)
    processor = get_family(family).image_processor(load_base_model(model_section).config, model_section)
    sampling = VideoSampling(fps=4, min_frames=2, max_frames=4)
    collate = PairCollator(Store({}, videos), processor, codec.pad_token_id, video_sampling=sampling)
    with pytest.warns(DroppedPairWarning, match="bad.*corrupt video"):
        batch = collate(rows)
    assert batch["pair_weight"].tolist() == [1.0, 0.0] and batch["video_counts"].tolist() == [1, 1]
    if family == "gemma4":  # 56x56 frames -> 192x192 px -> 24x24 patches -> 64 soft tokens each
        tokens = (batch["prompt_input_ids"] == codec.video_marker_id).sum(1).tolist()
        assert tokens == [64 * n for n in batch["num_frames_per_video"].tolist()] and tokens[0] == 4 * 64
        assert torch.isfinite(batch["pixel_values_videos"]).all()
        return
    if family == "internvl":  # 16 context tokens per frame; the broken video's blank stand-in a multiple of 2 frames
        tokens = (batch["prompt_input_ids"] == codec.image_marker_id).sum(1).tolist()
        assert tokens == [16 * n for n in batch["video_frames"].tolist()] and tokens[0] == 64
        assert torch.isfinite(batch["pixel_values_videos"]).all()
        return
    tokens = (batch["prompt_input_ids"] == codec.video_marker_id).sum(1).tolist()  # Qwen3-VL: + timestamps
    per_video = (batch["video_grid_thw"].prod(-1) // 4).tolist()
    assert tokens == per_video and per_video[0] == 8  # 4 frames -> 2 temporal patches x 4 tokens
    assert torch.isfinite(batch["pixel_values_videos"]).all()


def test_video_drops_are_explained_only_when_they_happened(capsys):
    from types import SimpleNamespace

    from silkie.train.build import _explain_video_drops

    recipe = SimpleNamespace(data=SimpleNamespace(video_max_frames=64), dpo=SimpleNamespace(max_length=512),
                             model=SimpleNamespace(family="qwen2_vl"))
    codec = SimpleNamespace(video_marker_id=7, video_token_budget=lambda frames: 8 * frames)
    _explain_video_drops(recipe, codec, SimpleNamespace(too_long_with_video=0))  # long pairs, none with a video
    assert capsys.readouterr().out == ""
    _explain_video_drops(recipe, codec, SimpleNamespace(too_long_with_video=3))
    assert capsys.readouterr().out.strip() == (
        "[silkie] warning: 3 pairs with a video were dropped as too_long: a video of data.video_max_frames = 64 "
        "frames may take 512 tokens, not below dpo.max_length = 512; lower model.video_max_pixels or "
        "data.video_max_frames, or raise dpo.max_length"
    )
    _explain_video_drops(recipe, SimpleNamespace(video_marker_id=None), SimpleNamespace(too_long_with_video=3))
    assert capsys.readouterr().out == ""  # a family without video


def test_a_run_whose_pictures_all_fail_to_decode_is_stopped_before_training(tmp_path):
    """Each pair got weight 0 and the run finished with loss 0 and FINISHED, having learned nothing."""
    from silkie.data.build import MEDIA_PROBE, check_images_decode
    from silkie.errors import InputError

    broken = {f"{i}.jpg": jpeg_bytes()[:40] for i in range(MEDIA_PROBE + 2)}
    store = ZipImageStore(write_zip(tmp_path / "m.zip", {**broken, "good.jpg": jpeg_bytes()}))
    pairs, _ = pairs_from_preference_rows([row(i, [f"{i}.jpg", "0.jpg"]) for i in range(MEDIA_PROBE + 2)], store)
    with pytest.raises(InputError) as refused:
        check_images_decode(pairs, store)
    assert str(refused.value).startswith(
        f"each of the first {MEDIA_PROBE} pictures of the training pairs fails to load from data.images "
        f"({tmp_path / 'm.zip'}); the first: cannot load image '0.jpg': corrupt image ("
    )
    assert str(refused.value).endswith("; a run would learn nothing")
    good = pairs_from_preference_rows([row(99, ["good.jpg"])], store)[0]
    with pytest.raises(InputError):  # a good picture past the first 16 is not tried
        check_images_decode(pairs + good, store)
    check_images_decode([pairs[-1], *good], store)  # one picture that loads is enough
    check_images_decode(pairs_from_preference_rows([row(7)], store)[0], store)  # text only: nothing to try
