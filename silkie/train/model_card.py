"""The finished adapter as something to take elsewhere: `adapter_config.json` names a base that resolves from
anywhere (the hub id when the base came from the hub, else its absolute folder), and `README.md` is a real model
card (base, recipe, data, steps, held-out reward accuracy, how to load it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from silkie.config import Recipe
from silkie.config.names import HUB_ID
from silkie.run_dir import ADAPTER_DIR, CONFIG_NAME

CARD_NAME = "README.md"
ADAPTER_CONFIG = "adapter_config.json"
NATIVE_LOADERS = {"qwen_vl": ("silkie.models.qwen_vl", "QWenLMHeadModel")}  # transformers has no Qwen-VL-Chat
HF_LOADER = ("transformers", "AutoModelForImageTextToText")


def portable_base(model_path: str) -> str:
    """What the adapter records as its base: the hub id when `model_path` is one (no such local folder), else the
    folder's absolute path (a relative one breaks as soon as the adapter is used from another directory)."""
    folder = Path(model_path).expanduser()
    if not folder.is_dir() and HUB_ID.match(model_path):
        return model_path
    return str(folder.resolve())


def load_snippet(family: str, base: str, adapter_dir: str, lora: bool) -> str:
    """Python that loads the trained model (base + adapter, or the fine-tuned folder) and its tokenizer."""
    native = family in NATIVE_LOADERS
    module, cls = NATIVE_LOADERS.get(family, HF_LOADER)
    tokenizer, tokenizer_from = ("QWenTokenizer", adapter_dir) if native else ("AutoProcessor", base)
    lines = [f"from {module} import {cls}, {tokenizer}"]
    if lora:
        lines += [
            "from peft import PeftModel",
            "",
            f"base = {cls}.from_pretrained({base!r})",
            f"model = PeftModel.from_pretrained(base, {adapter_dir!r}).eval()",
        ]
    else:
        lines += ["", f"model = {cls}.from_pretrained({adapter_dir!r}).eval()"]
    return "\n".join([*lines, f"tokenizer = {tokenizer}.from_pretrained({tokenizer_from!r})"])


def _row(name: str, value: Any) -> str:
    return f"| {name} | {value} |"


def render_card(recipe: Recipe, working: Path, base: str, metrics: dict, pairs: tuple[int, int], lora: bool) -> str:
    """The model card's markdown (a YAML header the hub reads, a facts table, the loading code, the commands)."""
    adapter_dir = str((working / ADAPTER_DIR).resolve())
    dpo, data = recipe.dpo, recipe.data
    accuracy = metrics.get("eval_rewards/accuracies")
    kind = f"LoRA r={recipe.lora.r}, alpha={recipe.lora.alpha}" if lora else "full fine-tuning"
    if dpo.sync_ref_model:
        kind += f"; TR-DPO (reference moved every {dpo.ref_model_sync_steps} steps, alpha {dpo.ref_model_mixup_alpha})"
    facts = [
        _row("base model", f"`{base}` ({recipe.model.family})"),
        _row("method", f"DPO, loss_type {dpo.loss_type}, beta {dpo.beta}; {kind}"),
        _row("recipe", f"`{(working / CONFIG_NAME).resolve()}`"),
        _row("data", f"`{data.path}` ({data.source}): {pairs[0]} train pairs, {pairs[1]} held-out pairs"),
        _row("steps", metrics.get("step", "n/a")),
    ]
    if "train_loss" in metrics:
        facts.append(_row("train loss", f"{metrics['train_loss']:.4f}"))
    if accuracy is not None:
        facts.append(_row("held-out reward accuracy", f"{accuracy:.3f} (chance is 0.5)"))
    header = ["---", f"base_model: {base}", f"library_name: {'peft' if lora else 'transformers'}"]
    header += ["tags:", "- silkie", "- dpo", *(["- lora"] if lora else []), "---", ""]
    body = [
        f"# {working.resolve().name}: DPO {'adapter' if lora else 'model'} for {Path(base).name}",
        "",
        "Preference-trained with [Silkie](https://arxiv.org/abs/2312.10665)'s recipe (DPO on VLFeedback-style pairs).",
        "",
        "| | |",
        "| --- | --- |",
        *facts,
        "",
        "## Load it",
        "",
        "```python",
        load_snippet(recipe.model.family, base, adapter_dir, lora),
        "```",
        "",
        "With Silkie installed: `silkie chat --model BASE --adapter ADAPTER --image IMG --question Q --compare` "
        "(base and DPO answers), `silkie merge --base BASE --adapter ADAPTER --out DIR` (one standalone folder), "
        "`silkie evaluate --run RUN --tasks mme` (benchmarks).",
        "",
    ]
    return "\n".join(header + body)


def finish_adapter(recipe: Recipe, model_path: str, working: Path, metrics: dict, pairs: tuple[int, int]) -> Path:
    """Point `adapter_config.json` at the portable base and write the model card; returns the card's path."""
    adapter_dir = working / ADAPTER_DIR
    base = portable_base(model_path)
    config = adapter_dir / ADAPTER_CONFIG
    lora = config.is_file()
    if lora:
        values = json.loads(config.read_text())
        values["base_model_name_or_path"] = base
        config.write_text(json.dumps(values, indent=2, sort_keys=True))
    card = adapter_dir / CARD_NAME
    card.write_text(render_card(recipe, working, base, metrics, pairs, lora))
    return card
