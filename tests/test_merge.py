"""`silkie merge` on a real (tiny) trained run: exact folding, the saved dtype and the share of the update it keeps,
the official folder's entries, hub ids from the cache, and never losing an input or an old output."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.script_fixtures import QUESTION, image_inputs, load_script

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_merge_lora_matches_base_plus_adapter(trained, tmp_path):
    from silkie.models.qwen_vl import QWenLMHeadModel, QWenTokenizer
    from silkie.tools.common import load_model

    out = tmp_path / "merged"
    argv = ["--base", str(trained.model_dir), "--adapter", str(trained.adapter_dir), "--out", str(out)]
    assert load_script("merge_lora").main(argv + ["--dtype", "fp32", "--max-shard-size", "400KB"]) == 0

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert all((out / shard).stat().st_size <= 400_000 + 16_384 for shard in shards)  # + safetensors header
    for name in ("config.json", "generation_config.json", "qwen.tiktoken", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"

    tokenizer = QWenTokenizer.from_pretrained(out)
    base_tokenizer = QWenTokenizer.from_pretrained(trained.model_dir)
    assert tokenizer.encode("There are two red circles.") == base_tokenizer.encode("There are two red circles.")
    ids, pixels = image_inputs(trained, tokenizer)
    merged = QWenLMHeadModel.from_pretrained(out).eval()
    peft_model = load_model(trained.model_dir, trained.adapter_dir)
    with torch.no_grad():
        merged_logits = merged(input_ids=ids, pixel_values=pixels).logits
        adapted_logits = peft_model(input_ids=ids, pixel_values=pixels).logits
        with peft_model.disable_adapter():
            base_logits = peft_model(input_ids=ids, pixel_values=pixels).logits
    assert (merged_logits - adapted_logits).abs().max().item() < 1e-5
    assert (merged_logits - base_logits).abs().max().item() > 1e-3


def test_merge_lora_bf16_default_single_file(trained, tmp_path, capsys):
    from silkie.models.qwen_vl import QWenLMHeadModel

    out = tmp_path / "merged-bf16"
    argv = ["--base", str(trained.model_dir), "--adapter", str(trained.adapter_dir), "--out", str(out)]
    assert load_script("merge_lora").main(argv) == 0
    printed = capsys.readouterr().out.strip()
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    model = QWenLMHeadModel.from_pretrained(out)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    # rounded once: the fp32 merge cast to bf16 (merging in bf16 rounded the LoRA update, then the sum)
    from silkie.tools.common import load_model

    peft_model = load_model(trained.model_dir, trained.adapter_dir, torch.float32)
    base = {name: w.clone() for name, w in peft_model.get_base_model().state_dict().items()}
    exact_fp32 = peft_model.merge_and_unload().state_dict()
    exact = {name: w.to(torch.bfloat16) for name, w in exact_fp32.items()}
    saved = model.state_dict()
    assert all(torch.equal(saved[name], exact[name]) for name in saved)
    # the printed share of the LoRA update that bf16 kept, recomputed from the saved and the fp32-merged weights
    changed = [name.replace(".base_layer", "") for name in base if ".base_layer.weight" in name]
    deltas = {name: exact_fp32[name] - base[name.replace(".weight", ".base_layer.weight")] for name in changed}
    kept = sum(((saved[n].float() - (exact_fp32[n] - deltas[n])) * deltas[n]).sum() for n in changed)
    share = (kept / sum((d * d).sum() for d in deltas.values())).item()
    assert printed == f"merged checkpoint: {out} (1 shard(s), bf16; {share:.0%} of the adapter's update kept)"
    chat = ["--model", str(out), "--image", str(trained.image), "--question", QUESTION, "--max-new-tokens", "4"]
    assert load_script("chat").main(chat + ["--dtype", "bf16", "--device", "cpu"]) == 0  # images encode in bf16
    assert capsys.readouterr().out.strip()


def test_merge_lora_keeps_the_official_remote_code_entries(trained, tmp_path):
    """A folder as published has `auto_map` in config.json and tokenizer_config.json (the original remote code's
    entry points) and `torch_dtype`; the merged folder keeps them, so the original code still loads it."""
    base = tmp_path / "Qwen-VL-Chat"
    shutil.copytree(trained.model_dir, base)
    config = json.loads((base / "config.json").read_text())
    config.update(auto_map={"AutoConfig": "configuration_qwen.QWenConfig"}, torch_dtype="bfloat16")
    (base / "config.json").write_text(json.dumps(config))
    official_tokenizer = {"model_max_length": 8192, "tokenizer_class": "QWenTokenizer",
                          "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}  # fmt: skip
    (base / "tokenizer_config.json").write_text(json.dumps(official_tokenizer))
    (base / "tokenization_qwen.py").write_text("# the remote code\n")
    out = tmp_path / "merged"
    argv = ["--base", str(base), "--adapter", str(trained.adapter_dir), "--out", str(out)]
    assert load_script("merge_lora").main(argv) == 0
    merged_tokenizer = json.loads((out / "tokenizer_config.json").read_text())
    assert merged_tokenizer["auto_map"] == official_tokenizer["auto_map"]
    assert merged_tokenizer["tokenizer_class"] == "QWenTokenizer"
    merged_config = json.loads((out / "config.json").read_text())
    assert merged_config["auto_map"] == config["auto_map"]
    assert merged_config["torch_dtype"] == merged_config["dtype"] == "bfloat16"
    assert (out / "tokenization_qwen.py").read_text() == "# the remote code\n"


def test_merge_and_chat_take_a_hub_id_from_the_local_hub_cache(trained, tmp_path, monkeypatch, capsys):
    """Training reads `model.path: org/name` from the hub cache offline, and the adapter records that id: the tools
    the model card names take it too."""
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-qwen-vl"
    shutil.copytree(trained.model_dir, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    out = tmp_path / "merged"
    base = ["--base", "someone/tiny-qwen-vl", "--adapter", str(trained.adapter_dir)]
    assert load_script("merge_lora").main([*base, "--out", str(out), "--dtype", "fp32"]) == 0
    assert (out / "model.safetensors").is_file() and (out / "qwen.tiktoken").is_file()
    chat = ["--image", str(trained.image), "--question", QUESTION, "--max-new-tokens", "4", "--device", "cpu"]
    capsys.readouterr()
    adapter = ["--adapter", str(trained.adapter_dir)]
    assert load_script("chat").main(["--model", "someone/tiny-qwen-vl", *adapter, *chat]) == 0
    from_hub = capsys.readouterr().out
    assert load_script("chat").main(["--model", str(out), *chat]) == 0
    assert capsys.readouterr().out == from_hub  # the merged folder answers as base + adapter from the cache
    assert load_script("merge_lora").main(["--base", "someone/absent", "--adapter", str(trained.adapter_dir),
                                           "--out", str(tmp_path / "x")]) == 2  # fmt: skip
    assert "someone/absent is no folder here and no snapshot of that hub id is in the local hub cache" in (
        capsys.readouterr().err
    )


def test_merge_lora_refuses_a_non_empty_out(trained, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    argv = ["--base", str(trained.model_dir), "--adapter", str(trained.adapter_dir), "--out", str(tmp_path)]
    assert load_script("merge_lora").main(argv) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"error: output folder {tmp_path} is not empty (pass --overwrite to replace it)"
    )


def test_merge_lora_overwrites_only_an_earlier_merge(trained, tmp_path, capsys):
    """--overwrite never replaces a training run's folder, nor one that holds no checkpoint."""
    run = tmp_path / "run"
    shutil.copytree(trained.run_dir, run)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    base = ["--base", str(trained.model_dir), "--adapter", str(trained.adapter_dir), "--overwrite"]
    for out, said in (
        (run, f"error: --out {run} holds a training run (its config.yaml and outputs); choose another --out"),
        (other, f"error: --out {other} holds no model checkpoint (no config.json): --overwrite replaces only an "
                "earlier merged folder; choose another --out"),
    ):  # fmt: skip
        before = sorted(p.relative_to(out) for p in out.rglob("*"))
        assert load_script("merge_lora").main(base + ["--out", str(out)]) == 2
        assert capsys.readouterr().err.strip() == said
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_merge_lora_never_deletes_its_inputs_or_an_old_output_on_failure(trained, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained.adapter_dir, run / "adapter")
    argv = ["--base", str(trained.model_dir), "--adapter", str(run / "adapter"), "--out", str(run), "--overwrite"]
    assert load_script("merge_lora").main(argv) == 2  # --out holds the adapter: refused, not wiped
    assert "would hold or sit inside the adapter folder" in capsys.readouterr().err
    assert (run / "adapter" / "adapter_model.safetensors").is_file()

    out, broken = tmp_path / "merged", tmp_path / "broken-adapter"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "old.txt").write_text("previous merge")
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{}")
    argv = ["--base", str(trained.model_dir), "--adapter", str(broken), "--out", str(out), "--overwrite"]
    assert load_script("merge_lora").main(argv) == 2  # it was peft's HFValidationError about a repo id
    assert capsys.readouterr().err.strip() == (
        f"error: adapter folder {broken} has no weights (adapter_model.safetensors or adapter_model.bin)"
    )
    shutil.copy(trained.adapter_dir / "adapter_model.safetensors", broken)
    assert load_script("merge_lora").main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot load the adapter in {broken} on {trained.model_dir}: KeyError")  # one line
    (broken / "adapter_config.json").write_text('{"base_model_name_or_path": "/models/other"}')
    assert load_script("merge_lora").main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot load the adapter in {broken} on {trained.model_dir} (it was trained on "
                           "/models/other): ")  # fmt: skip
    assert (out / "old.txt").read_text() == "previous merge"  # the failed merge left the old output alone


def test_an_adapter_of_another_family_is_refused_in_one_line(trained, tmp_path, capsys):
    """A Qwen-VL-Chat adapter on a Qwen2-VL base (or the reverse) names both folders, in merge_lora and
    evaluate_pairs alike (transformers' processor loader used to fail with a traceback)."""
    from silkie.dev.tiny_hf_vlm import build_tiny_qwen2_vl

    other = build_tiny_qwen2_vl(tmp_path / "tiny-qwen2-vl")
    capsys.readouterr()
    argv = ["--base", str(other), "--adapter", str(trained.adapter_dir), "--out", str(tmp_path / "merged")]
    assert load_script("merge_lora").main(argv) == 2
    expected = (
        f"error: the adapter in {trained.adapter_dir} was trained on a qwen_vl model ({trained.model_dir}), not on "
        f"{other} (qwen2_vl); give it a qwen_vl base model"
    )
    assert capsys.readouterr().err.strip().splitlines() == [expected]
    argv = ["--run", str(trained.run_dir), "--model", str(other), "--device", "cpu"]
    assert load_script("evaluate_pairs").main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [expected]
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize(("scale", "low", "high"), [(1e-5, 0.0, 0.1), (1.0, 0.99, 1.01)])
def test_update_kept_measures_what_bf16_rounds_away(scale, low, high):
    from peft import LoraConfig, get_peft_model

    from silkie.tools.merge import update_kept

    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(64, 64)), LoraConfig(r=4, target_modules=["0"]))
    with torch.no_grad():
        model.base_model.model[0].weight.fill_(1.0)  # weights of 1: bf16's step there is 2**-7
        model.base_model.model[0].lora_B["default"].weight.normal_(std=scale)
    assert update_kept(model, torch.float32) is None
    assert low <= update_kept(model, torch.bfloat16) <= high


def test_an_adapter_of_a_base_with_other_layers_or_sizes_is_refused_in_one_line(trained, tmp_path, capsys):
    """On a base with a third layer peft only warned and the merge said "100% kept" (layer 2 got no update); on a
    wider base the error listed every mismatched weight on its own line."""
    from silkie.dev.tiny_qwen_vl import build_tiny_checkpoint

    for name, size in (("deeper", {"layers": 3}), ("wider", {"hidden_size": 256})):
        base = build_tiny_checkpoint(tmp_path / name, **size)
        capsys.readouterr()
        argv = ["--base", str(base), "--adapter", str(trained.adapter_dir), "--out", str(tmp_path / f"merged-{name}")]
        assert load_script("merge_lora").main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"error: cannot load the adapter in {trained.adapter_dir}")
        assert not (tmp_path / f"merged-{name}").exists()
        if name == "deeper":
            assert err.endswith(": it holds 16 LoRA weights and the model's LoRA modules 24: the base has other "
                                "layers or modules than the one it was trained on")  # fmt: skip
        else:
            assert "weights differ in shape from the model's, e.g. size mismatch for base_model.model." in err
