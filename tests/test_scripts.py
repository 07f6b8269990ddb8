"""The command-line tools on a real (tiny) trained run: chat, plot, evaluate, release check (merge: test_merge.py)."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from tests.script_fixtures import QUESTION, image_inputs, load_script, run_script

SCRIPT_NAMES = ("merge_lora", "chat", "plot_metrics", "evaluate_pairs", "prepare_vlfeedback")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_every_script_has_help(name):
    done = run_script(name, "--help", timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:")
    assert "Example:" in done.stdout


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        ("chat", ["--sample", "--temperature", "0"], "--temperature must be > 0 with --sample"),
        ("chat", ["--device", "cuda:7"], "--device cuda:7: no such CUDA device here"),
        ("prepare_vlfeedback", ["--sample-images", "-5"], "--sample-images must be >= 0"),
        ("prepare_vlfeedback", ["--rating-rules", "original", "--aspect-weights", "Helpfulness=1"],
         "--aspect-weights needs --rating-rules checked"),  # fmt: skip
    ],
)
def test_bad_options_are_one_line_errors(name, args, message, tmp_path):
    base = {"chat": ["--model", str(tmp_path), "--image", str(tmp_path / "x.png"), "--question", "q"],
            "prepare_vlfeedback": [str(tmp_path / "x.jsonl"), str(tmp_path / "x.zip")]}  # fmt: skip
    if name == "chat":
        from PIL import Image

        Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
        (tmp_path / "config.json").write_text('{"model_type": "qwen"}')
    done = run_script(name, *base[name], *args, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr.strip().splitlines()[-1]


# ----- chat -------------------------------------------------------------------------------------------------------
def _greedy_answer(model, tokenizer, ids, pixels, max_new_tokens: int) -> tuple[str, list[int]]:
    stop = [tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id]
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            pixel_values=pixels,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop,
            pad_token_id=tokenizer.eod_id,
        )
    new = out[0, ids.size(1) :].tolist()
    return tokenizer.decode(new, skip_special_tokens=True), new


def test_chat_streams_the_greedy_answer(trained, capsys):
    from silkie.models.qwen_vl import QWenTokenizer
    from silkie.tools.common import load_model

    argv = ["--model", str(trained.model_dir), "--adapter", str(trained.adapter_dir), "--image", str(trained.image)]
    argv += ["--device", "cpu", "--dtype", "fp32"]
    assert load_script("chat").main(argv + ["--question", QUESTION, "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out

    tokenizer = QWenTokenizer.from_pretrained(trained.model_dir)
    ids, pixels = image_inputs(trained, tokenizer)
    expected, new_ids = _greedy_answer(load_model(trained.model_dir, trained.adapter_dir), tokenizer, ids, pixels, 12)
    assert len(new_ids) == 12 and all(i < len(tokenizer.mergeable_ranks) for i in new_ids)  # text tokens
    assert expected.strip()
    assert printed == expected + "\n"


def test_chat_compare_prints_base_and_dpo_blocks(trained, capsys):
    from silkie.models.qwen_vl import QWenTokenizer
    from silkie.tools.chat import BASE_LABEL, DPO_LABEL
    from silkie.tools.common import load_model

    argv = ["--model", str(trained.model_dir), "--adapter", str(trained.adapter_dir), "--image", str(trained.image)]
    argv += ["--device", "cpu", "--dtype", "fp32"]
    assert load_script("chat").main(argv + ["--question", QUESTION, "--max-new-tokens", "8", "--compare"]) == 0
    printed = capsys.readouterr().out

    tokenizer = QWenTokenizer.from_pretrained(trained.model_dir)
    ids, pixels = image_inputs(trained, tokenizer)
    model = load_model(trained.model_dir, trained.adapter_dir)
    with model.disable_adapter():
        base, _ = _greedy_answer(model, tokenizer, ids, pixels, 8)
    dpo, _ = _greedy_answer(model, tokenizer, ids, pixels, 8)
    assert printed == f"{BASE_LABEL}\n{base}\n\n{DPO_LABEL}\n{dpo}\n"


def test_chat_stops_at_im_end(trained):
    from silkie.models.qwen_vl import QWenLMHeadModel, QWenTokenizer
    from silkie.tools.chat import EMPTY_MARK, GenerationOptions, stream_answer

    tokenizer = QWenTokenizer.from_pretrained(trained.model_dir)
    model = QWenLMHeadModel.from_pretrained(trained.model_dir).eval()
    ids, pixels = image_inputs(trained, tokenizer)
    with torch.no_grad():  # point the <|im_end|> row at the last prompt state: it wins the first step
        last = model(input_ids=ids, pixel_values=pixels, return_hidden_states_only=True).hidden_states[-1][0, -1]
        model.lm_head.weight[tokenizer.im_end_id] = last * (1000.0 / last.pow(2).sum())
    pieces: list[str] = []
    assert stream_answer(model, tokenizer, ids, pixels, GenerationOptions(max_new_tokens=10), pieces.append) == ""
    assert "".join(pieces) == EMPTY_MARK == "(empty)"  # printed so; the answer itself stays empty
    _, new_ids = _greedy_answer(model, tokenizer, ids, pixels, 10)
    assert new_ids == [tokenizer.im_end_id]


def test_chat_missing_image_is_one_line_error(trained, tmp_path):
    missing = tmp_path / "no_such.jpg"
    done = run_script("chat", "--model", str(trained.model_dir), "--image", str(missing), "--question", QUESTION)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: image file not found: {missing}"]
    assert done.stdout == ""


# ----- plot_metrics -----------------------------------------------------------------------------------------------
def test_plot_metrics_writes_png(trained, tmp_path, capsys):
    out = tmp_path / "figs" / "curves.png"
    assert load_script("plot_metrics").main([str(trained.run_dir), "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000
    assert capsys.readouterr().out.strip() == f"plot: {out}"


def test_plot_panels_have_labels_the_chance_line_and_the_learning_rate():
    from silkie.train.plots import build_figure

    records = [
        {"step": s, "loss": 0.7 - s / 100, "rewards/accuracies": 0.5 + s / 40, "learning_rate": 1e-4 * s}
        for s in (1, 2, 3)
    ]
    records.append({"step": 3, "eval_loss": 0.66, "eval_rewards/accuracies": 0.7})
    fig = build_figure(records, "run-7: DPO training")
    shown = [ax for ax in fig.axes if ax.get_visible()]
    titles = [ax.get_title() for ax in shown]
    assert titles == ["loss", "reward accuracy", "reward margin", "chosen reward", "rejected reward", "learning rate"]
    assert all(ax.get_ylabel() and ax.get_xlabel() == "step" for ax in shown)
    accuracy = shown[1]
    chance = [line for line in accuracy.lines if line.get_label() == "chance"]
    assert len(chance) == 1 and list(chance[0].get_ydata()) == [0.5, 0.5] and accuracy.get_ylim() == (0, 1)
    assert [list(line.get_ydata()) for line in accuracy.lines if line.get_label() == "eval"] == [[0.7]]
    assert list(shown[5].lines[0].get_ydata()) == pytest.approx([1e-4, 2e-4, 3e-4])
    assert fig._suptitle.get_text() == "run-7: DPO training"
    width, height = fig.get_size_inches()
    assert width < 14 and height > 5  # a 3-column grid, not a one-row strip


def test_metrics_after_a_resume_plot_in_step_order_and_a_torn_line_is_skipped(tmp_path):
    """A killed run may leave a half-written line and steps that the resumed run logs again."""
    from silkie.train.plots import read_metrics, series

    lines = ['{"step": 1, "loss": 0.7}', '{"step": 2, "loss": 0.6}', '{"step": 3, "lo', '{"step": 2, "loss": 0.65}']
    lines.append('{"step": 3, "loss": 0.5}')
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match="skipped 1 line"):
        records = read_metrics(tmp_path / "metrics.jsonl")
    assert series(records, "loss") == ([1, 2, 3], [0.7, 0.65, 0.5])

    from types import SimpleNamespace

    from silkie.train.metrics import MetricsJsonlCallback

    path = tmp_path / "resumed.jsonl"
    path.write_text('{"step": 1, "loss": 0.7}\n{"step": 2, "lo')  # killed mid-write
    state = SimpleNamespace(is_world_process_zero=True, global_step=2, epoch=0.5)
    MetricsJsonlCallback(path).on_log(None, state, None, logs={"loss": 0.6})  # the resumed run's first record
    with pytest.warns(UserWarning, match="skipped 1 line"):
        assert series(read_metrics(path), "loss") == ([1, 2], [0.7, 0.6])  # the new record is not glued to it


def test_plot_metrics_without_metrics_is_one_line_error(tmp_path):
    done = run_script("plot_metrics", str(tmp_path))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / 'metrics.jsonl'}: no metrics file")


# ----- prepare_vlfeedback -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def broken_release(tmp_path_factory) -> tuple[Path, dict, dict]:
    from silkie.dev.synthetic import load_metadata, write_synthetic_vlfeedback

    root = tmp_path_factory.mktemp("release")
    summary = write_synthetic_vlfeedback(root, n=30, seed=3, bad_rows=4)
    bad = {meta["bad"]: row_id for row_id, meta in load_metadata(root).items() if meta["bad"]}
    return root, summary, bad


def test_prepare_vlfeedback_reports_and_converts(broken_release, tmp_path, capsys):
    from silkie.config import DataSection
    from silkie.data.build import build_pairs
    from silkie.data.sources import load_preference_file

    root, summary, bad = broken_release
    zip_path, report_path = root / "merged_images.zip", tmp_path / "report.json"
    argv = [str(root / "vlfeedback_80k.jsonl"), str(zip_path), "--convert", str(tmp_path / "out")]
    assert load_script("prepare_vlfeedback").main(argv + ["--min-margin", "1", "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    table = capsys.readouterr().out.splitlines()
    pairs = report["pairs"]
    candidates = pairs["pairs_kept"] + sum(pairs["pairs_dropped"].values())
    assert table[1:4] == [
        "  rows in the file              34",
        "  rows dropped                   2",
        f"      missing_field: 1 (first ids: {bad['missing_field']}; the first: prompt) (at reading)",
    ]  # fmt: skip (the synthetic bad row lacks its prompt: the field is named)
    assert f"  rows kept                     32  -> {candidates} candidate pairs" in table
    reconciled = (
        f"  (34 = 2 + 32 rows; {candidates} = {candidates - pairs['pairs_kept']} + {pairs['pairs_kept']} pairs)"
    )
    assert reconciled in table

    assert summary["bad_rows"] == {"missing_image": 1, "non_numeric_rating": 1, "empty_answer": 1, "missing_field": 1}
    assert report["rows_seen"] == summary["rows"] == 34
    assert report["rows_loaded"] == 33
    assert report["rows_skipped"] == {"missing_field": 1}
    assert report["skipped_ids"] == {"missing_field": [bad["missing_field"]]}
    check = report["image_check"]
    assert (check["referenced"], check["missing"], check["missing_ids"]) == (33, 1, [bad["missing_image"]])
    assert (check["verified"], check["unreadable"]) == (32, 0)
    pairs = report["pairs"]
    assert pairs["rows_dropped"] == {"missing_field": 1, "missing_image": 1}
    assert pairs["pairs_dropped"]["non_numeric_rating"] == 3  # one N/A answer of four: 3 of its 6 pairs
    assert pairs["pairs_dropped"]["empty_answer"] == 3
    assert pairs["offending_ids"]["non_numeric_rating"] == [bad["non_numeric_rating"]]
    assert pairs["offending_ids"]["empty_answer"] == [bad["empty_answer"]]
    assert pairs["pairs_dropped"]["below_margin"] > 0

    parquet = Path(report["converted"])
    assert parquet == tmp_path / "out" / "vlfeedback_pairs.parquet"
    loaded = load_preference_file(parquet)
    assert len(loaded.rows) == pairs["pairs_kept"] > 0 and not loaded.skipped
    assert all(row.chosen_score - row.rejected_score >= 1.0 for row in loaded.rows)
    section = DataSection(source="preference", path=str(parquet), images=str(zip_path), eval_fraction=0.2)
    train, evaluation, _, pair_report = build_pairs(section)
    assert len(train) + len(evaluation) == pairs["pairs_kept"]
    assert not {p.prompt_id for p in train} & {p.prompt_id for p in evaluation}


def test_prepare_vlfeedback_with_the_original_rating_rules(broken_release, tmp_path):
    root, _, bad = broken_release
    reports = {}
    for rules in ("checked", "original"):
        path = tmp_path / f"{rules}.json"
        argv = [str(root / "vlfeedback_80k.jsonl"), str(root / "merged_images.zip"), "--json", str(path)]
        assert load_script("prepare_vlfeedback").main([*argv, "--rating-rules", rules]) == 0
        reports[rules] = json.loads(path.read_text())
    checked, original = (reports[name]["pairs"] for name in ("checked", "original"))
    assert reports["original"]["rules"]["rating_rules"] == "original"
    # the repository's rules keep the empty answer's pairs (3 dropped by the checked rules)
    assert checked["pairs_dropped"]["empty_answer"] == 3 and "empty_answer" not in original["pairs_dropped"]
    assert original["pairs_dropped"]["non_numeric_rating"] == checked["pairs_dropped"]["non_numeric_rating"] == 3
    assert original["pairs_kept"] > checked["pairs_kept"]


def test_prepare_vlfeedback_finds_unreadable_images(broken_release, tmp_path, capsys):
    root, _, bad = broken_release
    folder = tmp_path / "images"
    with zipfile.ZipFile(root / "merged_images.zip") as archive:
        archive.extractall(folder)
    victim = sorted((folder / "merged_images").iterdir())[0]
    victim.write_bytes(b"not a jpeg")
    argv = [str(root / "vlfeedback_80k.jsonl"), str(folder), "--verify-images", "--strict"]
    assert load_script("prepare_vlfeedback").main(argv + ["--convert", str(tmp_path / "out")]) == 1
    captured = capsys.readouterr()
    printed = captured.out
    assert "decoded 32 of 32 present, unreadable 1" in printed
    assert f"unreadable_image: 1 (first ids: {victim.stem})" in printed
    assert captured.err.splitlines() == [
        "error: --strict: 1 row(s) skipped at reading (missing_field), 1 image(s) missing, 1 image(s) unreadable"
    ]

    from silkie.data.sources import load_preference_file

    rows = load_preference_file(tmp_path / "out" / "vlfeedback_pairs.parquet").rows
    assert victim.stem not in {row.id for row in rows} and bad["missing_image"] not in {row.id for row in rows}


def test_prepare_vlfeedback_bad_aspect_name_is_one_line_error(broken_release, capsys):
    root, _, _ = broken_release
    argv = [str(root / "vlfeedback_80k.jsonl"), str(root / "merged_images.zip"), "--aspect-weights", "Honesty=1"]
    assert load_script("prepare_vlfeedback").main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --aspect-weights: 'Honesty' names no single aspect")


def test_parse_aspect_weights_accepts_prefixes_and_json():
    from silkie.tools.prepare import parse_aspect_weights

    assert parse_aspect_weights("help=1, visual=2") == {"Helpfulness": 1.0, "Visual Faithfulness": 2.0}
    assert parse_aspect_weights('{"Ethical Considerations": 0.5}') == {"Ethical Considerations": 0.5}
    assert parse_aspect_weights(None) is None


def test_missing_release_file_is_one_line_error(tmp_path):
    done = run_script("prepare_vlfeedback", str(tmp_path / "absent.jsonl"), str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: VLFeedback jsonl not found: {tmp_path / 'absent.jsonl'}"]
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_prepare_checks_a_preference_file_as_training_reads_it(tmp_path, capsys):
    from silkie.dev.clips import colour_clip

    from .data_fixtures import jpeg_bytes, write_jsonl

    media = tmp_path / "media"
    media.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (media / name).write_bytes(jpeg_bytes())
    (media / "broken.jpg").write_bytes(b"not a picture")
    (media / "clip.mkv").write_bytes(colour_clip([(255, 0, 0), (0, 0, 255)] * 2))

    def pair(row_id, **extra):
        return {"id": row_id, "prompt": "<image>\nWhich?", "chosen": "left", "rejected": "right", **extra}

    video = {"id": "p5", "prompt": "<video>\nWhat moves?", "chosen": "red", "rejected": "blue", "videos": ["clip.mkv"]}
    rows = [pair("p1", images=["a.jpg", "b.jpg"], prompt="Compare <image> and <image>."), pair("p2", image="a.jpg"),
            pair("p3", image="gone.jpg"), pair("p4", image="broken.jpg"), video,
            pair("p6", images=["a.jpg"] * 9, prompt="Nine pictures.")]  # fmt: skip (p6: over training's 8)
    source = write_jsonl(tmp_path / "pairs.jsonl", rows)
    assert load_script("prepare_vlfeedback").main([str(source), str(media), "--json", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"preference file: {source}") and "rules: none (ready pairs, one per row)" in printed
    report = json.loads((tmp_path / "r.json").read_text())
    check = report["image_check"]
    assert (check["referenced"], check["missing"], check["missing_ids"]) == (6, 1, ["p3"])
    assert check["verified"] == 5 and list(check["unreadable_ids"]) == ["p4"]
    assert report["pairs"]["pairs_kept"] == 3 and report["pairs"]["rows_dropped"] == {
        "missing_image": 1, "unreadable_image": 1, "too_many_images": 1}  # fmt: skip
    refused = load_script("prepare_vlfeedback").main([str(source), str(media), "--convert", str(tmp_path / "out")])
    assert refused == 2 and "already holds pairs; train on it with data.source=preference" in capsys.readouterr().err
