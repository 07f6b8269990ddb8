"""Builders for the script tests: demo assets plus one short LoRA DPO run, and script loading."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:
    import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = REPO_ROOT / "scripts"
TRAIN_STEPS = 6
TRAIN_PROMPTS = 40


@dataclass
class TrainedRun:
    """Paths of the shared fixture: tiny checkpoint, synthetic release, finished run, a test image."""

    model_dir: Path
    data_dir: Path
    run_dir: Path
    image: Path

    @property
    def adapter_dir(self) -> Path:
        """The run's LoRA adapter folder."""
        return self.run_dir / "adapter"


def load_script(name: str) -> ModuleType:
    """Import `scripts/<name>.py` as a module (to call its `main(argv)` in-process)."""
    spec = importlib.util.spec_from_file_location(f"silkie_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `scripts/<name>.py ARGS` in a fresh interpreter; returns the completed process (text output)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, str(SCRIPTS / f"{name}.py"), *args]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def make_text_speaking(model_dir: Path) -> None:
    """Zero the LM-head rows of special and padding ids, so greedy decoding of the random model emits text.

    (The random tiny model otherwise prefers an unused special id, and every answer decodes to "".)
    """
    import torch

    from silkie.models.qwen_vl import QWenLMHeadModel, QWenTokenizer

    tokenizer = QWenTokenizer.from_pretrained(model_dir)
    model = QWenLMHeadModel.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight[len(tokenizer.mergeable_ranks) :] = 0.0
    model.save_pretrained(model_dir)


def build_trained_run(root: Path) -> TrainedRun:
    """Tiny checkpoint + synthetic release + a 6-step LoRA DPO run of the demo recipe (about 15 s on a CPU)."""
    from silkie.dev.synthetic import write_synthetic_vlfeedback
    from silkie.dev.tiny_qwen_vl import build_tiny_checkpoint

    model_dir, data_dir, run_dir = root / "tiny-qwen-vl", root / "vlfeedback", root / "run"
    build_tiny_checkpoint(model_dir)
    make_text_speaking(model_dir)
    write_synthetic_vlfeedback(data_dir, n=TRAIN_PROMPTS)
    overrides = [
        f"model.path={model_dir}",
        f"data.path={data_dir / 'vlfeedback_80k.jsonl'}",
        f"data.images={data_dir / 'merged_images.zip'}",
        f"data.max_prompts={TRAIN_PROMPTS}",
        f"training.max_steps={TRAIN_STEPS}",
        "training.learning_rate=5.0e-3",
        "training.report_to=none",
        "training.per_device_eval_batch_size=5",  # a partial last eval batch: metrics must weigh pairs, not batches
    ]
    # CPU only (same numbers on every machine); one thread: on a small busy CPU more threads are 20x slower
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "train_dpo.py", "--config", "dpo_config/demo.yaml", "--working", str(run_dir)]
    done = subprocess.run(command + overrides, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 or not (run_dir / "adapter" / "adapter_model.safetensors").is_file():
        raise RuntimeError(
            f"fixture training failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    image = root / "shapes.png"
    Image.new("RGB", (64, 48), (220, 30, 30)).save(image)
    return TrainedRun(model_dir=model_dir, data_dir=data_dir, run_dir=run_dir, image=image)


QUESTION = "What is in the picture?"


def image_inputs(trained: TrainedRun, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt ids and pixels of QUESTION about the run's picture, as `silkie chat` builds them."""
    import torch

    from silkie.models.qwen_vl import QWenVLImageProcessor
    from silkie.tools.chat import build_prompt_ids
    from silkie.tools.cli import read_image

    ids = torch.tensor([build_prompt_ids(tokenizer, trained.image, QUESTION)])
    return ids, QWenVLImageProcessor(56)([read_image(trained.image)])
