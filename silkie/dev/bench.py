"""Side-by-side DPO step benchmark: plain (TRL-equivalent) path vs the efficient path, same model and data.

Random weights are built directly on the device; the batches are random token ids laid out like
Silkie's prompts (system + `<img>` span + question, two answers) with random pixels.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import statistics
import threading
import time
from dataclasses import asdict, dataclass

import psutil
import torch
from torch.utils.flop_counter import FlopCounterMode

from silkie.config import DPOSection, LoraSection
from silkie.dpo.losses import DPOObjective
from silkie.dpo.objective import adapter_reference, batch_dpo_loss
from silkie.dpo.step import StepOptions
from silkie.models.loading import apply_lora
from silkie.models.qwen_vl import QWenConfig
from silkie.models.qwen_vl.configuration import official_config  # noqa: F401  (the scripts import it from here)

PATHS = {
    "plain": StepOptions(image_once=False, share_prompt=False, chunked_logps=False),
    "optimized": StepOptions(image_once=True, share_prompt=True, chunked_logps=True),
    "optimized+cached_ref": StepOptions(image_once=True, share_prompt=True, chunked_logps=True),
}
CACHED_REFERENCE = "optimized+cached_ref"
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks
SYSTEM_TOKENS, IMAGE_SPAN = 20, 258


@dataclass
class BenchResult:
    """One (path, batch size) measurement."""

    path: str
    batch_size: int
    step_seconds: float
    step_seconds_spread: float
    pairs_per_second: float
    tokens_per_second: float
    peak_memory_gib: float
    tflop_per_pair: float | None
    mfu: float | None
    reference_precompute_seconds_per_pair: float | None = None


def tiny_config() -> QWenConfig:
    """The tiny stand-in's architecture (vocabulary as the demo checkpoint)."""
    from silkie.dev.tiny_qwen_vl import tiny_config as make

    return make(num_ranks=512)


def build_model(config: QWenConfig, device: str, dtype: torch.dtype, lora: LoraSection, checkpointing: bool):
    """Random-weight model created on `device` in `dtype`, LoRA-wrapped, vision frozen, dropout off (the training
    default, `dpo.disable_dropout`)."""
    from silkie.dev.tiny_qwen_vl import random_model

    model = apply_lora(random_model(config, device, dtype), lora, disable_dropout=True)
    if checkpointing:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def synthetic_batch(config: QWenConfig, batch_size: int, question: int, answer: int, seed: int) -> dict:
    """Random pair batch in the collator's layout: each prompt holds one image span."""
    gen = torch.Generator().manual_seed(seed)
    start = config.image_start_id
    text_hi = min(start - 214, config.vocab_size) - 1
    span = torch.tensor([start] + [start + 2] * 256 + [start + 1])

    def text(n: int) -> torch.Tensor:
        return torch.randint(0, text_hi, (n,), generator=gen)

    def jitter(n: int) -> int:
        return max(1, int(n * (0.8 + 0.4 * torch.rand((), generator=gen).item())))

    prompts = [torch.cat([text(SYSTEM_TOKENS), span, text(jitter(question))]) for _ in range(batch_size)]
    chosen = [text(jitter(answer)) for _ in range(batch_size)]
    rejected = [text(jitter(answer)) for _ in range(batch_size)]
    batch = {}
    for name, rows in (("prompt", prompts), ("chosen", chosen), ("rejected", rejected)):
        width = max(len(r) for r in rows)
        ids = torch.zeros(batch_size, width, dtype=torch.long)
        mask = torch.zeros(batch_size, width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)], mask[i, : len(row)] = row, 1
        batch[f"{name}_input_ids"], batch[f"{name}_attention_mask"] = ids, mask
    size = config.visual["image_size"]
    batch["pixel_values"] = torch.randn(batch_size, 3, size, size, generator=gen)
    batch["image_index"] = torch.arange(batch_size)
    return batch


def pair_tokens(batch: dict) -> int:
    """Distinct tokens of the batch's pairs (prompt once + both answers)."""
    return int(sum(batch[f"{k}_attention_mask"].sum() for k in ("prompt", "chosen", "rejected")))


class PeakMemory:
    """Peak device memory (CUDA allocator) or peak process RSS growth sampled every 5 ms (CPU)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            gc.collect()
            if ctypes.util.find_library("c"):  # hand freed heap back to the OS so RSS starts from the live set
                ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
            process = psutil.Process()
            base = process.memory_info().rss

            def sample() -> None:
                while not self._stop.is_set():
                    self.peak = max(self.peak, process.memory_info().rss - base)
                    time.sleep(0.005)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_step(model, optimizer, batch: dict, options: StepOptions, dpo: DPOSection, device: str, reference=None):
    """One full optimizer step (policy + reference, backward, AdamW); returns the loss.

    `reference(batch, features)` overrides the on-the-fly reference (adapters disabled).
    """
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    objective = DPOObjective.from_section(dpo)
    loss, _ = batch_dpo_loss(model, batch, options, objective, 0, reference or adapter_reference(model, options, 0))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def precompute_reference(model, batches: list[dict], options: StepOptions, device: str) -> tuple[list, float]:
    """Reference log-probs of each batch (as `precompute_ref_log_probs` does once before training) and its time."""
    from silkie.dpo.step import encode_images_once

    reference = adapter_reference(model, options, 0)
    tables = []
    _sync(device)
    start = time.perf_counter()
    for batch in batches:
        moved = {k: v.to(device) for k, v in batch.items()}
        features = encode_images_once(model, moved)
        tables.append(reference(moved, features))
    _sync(device)
    return tables, time.perf_counter() - start


def peak_tflops(device: str, override: float | None) -> float | None:
    """Dense bf16 peak of the device (None on CPU unless given)."""
    if override:
        return override
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((value for key, value in PEAK_TFLOPS.items() if key in name), None)


def measure(model, config: QWenConfig, path: str, batch_size: int, args) -> BenchResult:
    """Warm up, time `args.steps` steps (median), count FLOPs of one step, record peak memory."""
    options = PATHS[path]
    options = StepOptions(options.image_once, options.share_prompt, options.chunked_logps, args.chunk_size)
    dpo = DPOSection(beta=0.1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-6)
    batches = [synthetic_batch(config, batch_size, args.question_tokens, args.answer_tokens, seed) for seed in range(3)]
    references, precompute_seconds = [None] * len(batches), None
    if path == CACHED_REFERENCE:
        tables, seconds = precompute_reference(model, batches, options, args.device)
        references = [lambda batch, features, table=table: table for table in tables]
        precompute_seconds = seconds / (len(batches) * batch_size)
    times = []
    with PeakMemory(args.device) as memory:
        for step in range(args.warmup + args.steps):
            batch, reference = batches[step % len(batches)], references[step % len(batches)]
            _sync(args.device)
            start = time.perf_counter()
            train_step(model, optimizer, batch, options, dpo, args.device, reference)
            _sync(args.device)
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
    flops = None
    if args.count_flops:
        with FlopCounterMode(display=False) as counter:
            train_step(model, optimizer, batches[0], options, dpo, args.device, references[0])
        flops = counter.get_total_flops()
    median = statistics.median(times)
    tokens = statistics.mean(pair_tokens(b) for b in batches)
    peak = peak_tflops(args.device, args.peak_tflops)
    per_pair = flops / batch_size if flops else None
    return BenchResult(
        path=path,
        batch_size=batch_size,
        step_seconds=median,
        step_seconds_spread=max(times) - min(times),
        pairs_per_second=batch_size / median,
        tokens_per_second=tokens / median,
        peak_memory_gib=memory.peak / 2**30,
        tflop_per_pair=per_pair / 1e12 if per_pair else None,
        mfu=(flops / median / 1e12 / peak) if flops and peak else None,
        reference_precompute_seconds_per_pair=precompute_seconds,
    )


def format_table(results: list, baseline: str = "plain") -> str:
    """Markdown table, then each path's pairs/s and peak-memory ratios against `baseline` per batch size."""
    lines = [
        "| path | batch | step s | pairs/s | tokens/s | peak GiB | TFLOP/pair | MFU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        mfu = f"{r.mfu:.1%}" if r.mfu is not None else "n/a"
        tflop = f"{r.tflop_per_pair:.2f}" if r.tflop_per_pair is not None else "n/a"
        lines.append(
            f"| {r.path} | {r.batch_size} | {r.step_seconds:.3f} | {r.pairs_per_second:.2f} | "
            f"{r.tokens_per_second:.0f} | {r.peak_memory_gib:.2f} | {tflop} | {mfu} |"
        )
    lines += ["", f"| batch | path | pairs/s ratio (vs {baseline}) | peak memory ratio (vs {baseline}) |"]
    lines.append("| --- | --- | --- | --- |")
    by_key = {(r.path, r.batch_size): r for r in results}
    paths = list(dict.fromkeys(r.path for r in results if r.path != baseline))
    for size in sorted({r.batch_size for r in results}):
        base = by_key.get((baseline, size))
        for path in paths:
            fast = by_key.get((path, size))
            if base and fast:
                memory = fast.peak_memory_gib / base.peak_memory_gib if base.peak_memory_gib > 0 else float("nan")
                lines.append(
                    f"| {size} | {path} | {fast.pairs_per_second / base.pairs_per_second:.2f}x | {memory:.2f}x |"
                )
    cached = [r for r in results if r.reference_precompute_seconds_per_pair is not None]
    for r in cached:
        per_pair = r.reference_precompute_seconds_per_pair * 1e3
        lines.append(f"\nreference precompute (batch {r.batch_size}): {per_pair:.1f} ms/pair, once per run")
    return "\n".join(lines)


def results_json(results: list[BenchResult], meta: dict) -> str:
    """JSON report with the run's settings."""
    return json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=2)
