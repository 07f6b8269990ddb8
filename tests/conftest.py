"""Shared fixtures: tiny Qwen-VL configs and models built in code (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):  # `-n N`: the workers share the cores (their subprocesses inherit it)
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // _workers))  # this process's cores
import torch  # noqa: E402  (after the thread count: torch reads it at import)

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(__file__).resolve().parent / "reference"

from silkie.dev.probe import image_prompt_ids  # noqa: E402, F401  (the tests import it from here)


def tiny_config_kwargs(vocab_base: int = 1000) -> dict:
    """Tiny Qwen-VL: hidden 128, 2 layers, 56-px ViT; special ids numbered from `vocab_base`."""
    return dict(
        vocab_size=vocab_base + 256,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        kv_channels=32,
        intermediate_size=512,
        seq_length=2048,
        visual=dict(
            heads=4,
            image_size=56,
            image_start_id=vocab_base + 214,
            layers=2,
            mlp_ratio=2.0,
            output_dim=128,
            patch_size=14,
            width=64,
        ),
    )


@pytest.fixture
def tiny_config():
    from silkie.models.qwen_vl import QWenConfig

    return QWenConfig(**tiny_config_kwargs())


@pytest.fixture
def tiny_model(tiny_config):
    from silkie.models.qwen_vl import QWenLMHeadModel

    torch.manual_seed(0)
    return QWenLMHeadModel(tiny_config).eval()


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """Tiny Qwen-VL checkpoint + synthetic VLFeedback release, shared by the training tests."""
    from .train_fixtures import make_assets

    return make_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One short LoRA DPO run shared by the tool tests (`tests.script_fixtures.TrainedRun`)."""
    from .script_fixtures import build_trained_run

    return build_trained_run(tmp_path_factory.mktemp("trained"))


@pytest.fixture
def one_torch_thread():
    """One intra-op thread per test: the tiny models gain nothing from more, and a busy CPU loses a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
