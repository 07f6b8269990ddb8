"""Model-side helpers of the tools: dtype/device names and base checkpoint + LoRA adapter loading."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from silkie.errors import weight_mismatch_line
from silkie.tools.cli import ToolError, require_dir, require_model_dir

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # what peft saves
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` -> the first CUDA GPU when there is one, else the CPU; a device that is not there is a `ToolError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ToolError(f"--device {name!r} is not a device name (auto, cpu, cuda, cuda:1, ...)") from err
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ToolError(f"--device {name}: no such CUDA device here (use --device cpu or auto)")
    return device


def resolve_tool_dtype(name: str) -> torch.dtype:
    """`auto` -> bf16 on a GPU that supports it, else fp32; otherwise one of `DTYPES`."""
    from silkie.models.loading import resolve_dtype

    return resolve_dtype(name)


def load_tokenizer_from(*folders: str | Path | None) -> Any:
    """The `QWenTokenizer` of the first folder holding `qwen.tiktoken` (e.g. the adapter, then the base)."""
    from silkie.models.qwen_vl import QWenTokenizer
    from silkie.models.qwen_vl.tokenization import VOCAB_FILE

    for folder in folders:
        if folder is not None and (Path(folder) / VOCAB_FILE).is_file():
            return QWenTokenizer.from_pretrained(folder)
    named = ", ".join(str(f) for f in folders if f is not None)
    raise ToolError(f"no {VOCAB_FILE} tokenizer file in {named}")


def family_of(model_dir: str | Path) -> str:
    """The model family of a checkpoint folder, from its `config.json` `model_type`."""
    from silkie.config.checkpoint import model_type_of
    from silkie.config.names import MODEL_TYPES

    folder = require_model_dir(model_dir)
    try:
        model_type = model_type_of(folder)
    except ValueError as err:
        raise ToolError(str(err)) from err
    if model_type not in MODEL_TYPES:
        raise ToolError(f"{folder / 'config.json'}: model_type {model_type!r} is not one of {sorted(MODEL_TYPES)}")
    return MODEL_TYPES[model_type]


def _check_same_family(family: str, model_dir: str | Path, folders: tuple) -> None:
    """ToolError when a folder's saved tokenizer (e.g. a trained adapter's) is another family's than the model's:
    `qwen.tiktoken` is Qwen-VL-Chat's, a `tokenizer_config.json` without it a transformers family's."""
    from silkie.models.qwen_vl.tokenization import VOCAB_FILE

    for folder in (Path(f) for f in folders if f is not None):
        qwen_vl = (folder / VOCAB_FILE).is_file()
        if qwen_vl == (family == "qwen_vl") or not (qwen_vl or (folder / "tokenizer_config.json").is_file()):
            continue
        saved = "a Qwen-VL-Chat tokenizer (qwen.tiktoken)" if qwen_vl else "a transformers tokenizer, no qwen.tiktoken"
        raise ToolError(f"{folder} holds {saved}: it belongs to another model family than {model_dir} ({family})")


def load_codec_from(model_dir: str | Path, *folders: str | Path | None, section: Any = None) -> Any:
    """The family's text codec: tokenizer (and processor) files from the first of `folders` holding them.

    `section` (the run's `model:` recipe section) carries the pixel bounds and chat template arguments the run
    trained with.
    """
    from silkie.config import ModelSection
    from silkie.models.family import get_family
    from silkie.models.qwen_vl.family import QwenVLCodec

    model_dir = require_model_dir(model_dir)  # once: a hub id's snapshot is looked up here, not again below
    family = family_of(model_dir)
    for folder in (Path(f) for f in folders if f is not None and (Path(f) / "adapter_config.json").is_file()):
        trained = trained_family(folder)
        if trained is not None and trained != family:
            raise ToolError(
                f"the adapter in {folder} was trained on a {trained} model{_base_named(folder)}, not on {model_dir} "
                f"({family}); give it a {trained} base model"
            )
    _check_same_family(family, model_dir, folders)  # what the adapter does not say, its tokenizer files may
    if family == "qwen_vl":
        return QwenVLCodec(load_tokenizer_from(*folders, model_dir))
    found = next((Path(f) for f in (*folders, model_dir) if f and (Path(f) / "tokenizer_config.json").is_file()), None)
    if found is None:
        raise ToolError(f"no tokenizer_config.json in {', '.join(str(f) for f in (*folders, model_dir) if f)}")
    bounds = {}
    if section is not None:
        # as the run's codec: its image bounds and chat template variables
        names = ("min_pixels", "max_pixels", "max_tiles", "max_image_tokens", "chat_template_kwargs")
        bounds = {name: getattr(section, name) for name in names}
    return get_family(family).load_codec(ModelSection(path=str(model_dir), family=family, **bounds), files=str(found))


def load_model(
    model_dir: str | Path, adapter_dir: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """The base checkpoint in `dtype` (eval mode), wrapped with the LoRA adapter from `adapter_dir` when given.

    A folder that cannot be loaded (bad config, missing or corrupt weights, an adapter of another model) is a
    `ToolError` naming it.
    """
    model_dir = require_model_dir(model_dir)  # once: a hub id's snapshot is looked up here, not again below
    family = family_of(model_dir)
    try:
        model = _load_base(family, model_dir, dtype)
    except ToolError:
        raise
    except Exception as err:  # transformers/safetensors raise many types for a bad checkpoint folder
        raise ToolError(f"cannot load the model in {model_dir}: {type(err).__name__}: {err}") from err
    if adapter_dir is not None:
        from peft import PeftModel

        adapter_dir = require_dir(adapter_dir, "adapter folder", "adapter_config.json")
        if not any((adapter_dir / name).is_file() for name in ADAPTER_WEIGHTS):
            raise ToolError(f"adapter folder {adapter_dir} has no weights ({' or '.join(ADAPTER_WEIGHTS)})")
        try:
            with warnings.catch_warnings():  # the missing keys it warns of are refused below, in one line
                warnings.filterwarnings("ignore", "Found missing adapter keys", UserWarning)
                model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
            problem = _adapter_fit_problem(model, adapter_dir)
        except Exception as err:  # peft: a bad adapter_config.json, or an adapter for other modules
            problem = f"{type(err).__name__}: {weight_mismatch_line(str(err))}"
        if problem:
            on = f"{model_dir}{_trained_on(adapter_dir)}"
            raise ToolError(f"cannot load the adapter in {adapter_dir} on {on}: {problem}")
    return model.eval()


def _adapter_fit_problem(model: torch.nn.Module, adapter_dir: Path) -> str | None:
    """Why the adapter's saved weights are not as many as the wrapped model's LoRA modules hold (an adapter of a
    base with more or fewer layers: peft only warns of missing ones, ignores extra ones, and the modules without
    weights stay at their no-op init). Counted, not compared by name: peft renames the keys of older layouts."""
    from peft import get_peft_model_state_dict
    from peft.utils import load_peft_weights

    saved = len(load_peft_weights(str(adapter_dir), device="cpu"))
    expected = len(get_peft_model_state_dict(model, save_embedding_layers=False))
    if saved == expected:
        return None
    return (f"it holds {saved} LoRA weights and the model's LoRA modules {expected}: the base has other layers or "
            "modules than the one it was trained on")  # fmt: skip


def trained_family(adapter_dir: Path) -> str | None:
    """The family of the base an adapter was trained on: its run's `model.family` (RUN/config.yaml beside
    RUN/adapter), else that of the base folder named in `adapter_config.json` where it exists here; None when
    neither says."""
    import yaml

    from silkie.config.checkpoint import checkpoint_family
    from silkie.run_dir import CONFIG_NAME

    try:
        recipe = yaml.safe_load((adapter_dir.resolve().parent / CONFIG_NAME).read_text())
        family = recipe["model"]["family"]
        if isinstance(family, str):
            return family
    except (OSError, ValueError, yaml.YAMLError, KeyError, TypeError):
        pass
    base = _named_base(adapter_dir)
    return checkpoint_family(base) if isinstance(base, str) else None


def _named_base(adapter_dir: Path) -> str | None:
    """The base model an adapter's `adapter_config.json` names, or None."""
    try:
        return json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path") or None
    except (OSError, ValueError, AttributeError):
        return None


def _trained_on(adapter_dir: Path) -> str:
    """` (it was trained on BASE)`, from the adapter's config, or nothing when it does not say."""
    base = _named_base(adapter_dir)
    return f" (it was trained on {base})" if base else ""


def _base_named(adapter_dir: Path) -> str:
    base = _named_base(adapter_dir)
    return f" ({base})" if base else ""


def _load_base(family: str, model_dir: Path, dtype: torch.dtype) -> torch.nn.Module:
    if family == "qwen_vl":
        from silkie.models.qwen_vl import QWenLMHeadModel

        # .to(dtype): from_pretrained(dtype=bf16) leaves the resampler's fp32 `pos_embed` in fp32 (mixed dtypes)
        model = QWenLMHeadModel.from_pretrained(model_dir, dtype=dtype).to(dtype)
    else:
        from silkie.config import ModelSection
        from silkie.models.family import get_family

        model = get_family(family).load_model(ModelSection(path=str(model_dir), family=family), dtype)
    return model


def refuse_template_kwargs(kwargs: dict | None, model: str, family: str) -> None:
    """`ToolError` for chat template variables given to a Qwen-VL-Chat `model`, whose prompts are the original's
    format, not a chat template's."""
    if kwargs is not None and family == "qwen_vl":
        raise ToolError(
            f"pool model {model}: chat_template_kwargs = {kwargs!r}: null for a qwen_vl model (its prompt format is "
            "the original's, not a chat template)"
        )
