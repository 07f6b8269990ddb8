"""Side-by-side DPO training benchmarks: every run is full training steps through a trainer, ours built by the
production `build_trainer` from a recipe (data loading, collation and image processing included). The time of a
step is the wall time between consecutive step ends, the median over the timed steps; the model is rebuilt from
the same seed for every run, so each trainer starts from identical weights and the peak memory of one run does not
include another's. Qwen-VL-Chat runs: `silkie.dev.bench_qwen_vl`; TRL's DPOTrainer vs ours: `silkie.dev.bench_trl`.
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
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from PIL import Image
from transformers import TrainerCallback

from silkie.config import Recipe, recipe_from_dict
from silkie.config.names import QWEN_HF_FAMILIES

OURS = {  # run name -> the recipe's dpo switches (the plain path is TRL's: full logits, no sharing)
    "silkie-plain": {"image_once": False, "share_prompt": False, "chunked_logps": False},
    "silkie-optimized": {"image_once": True, "share_prompt": True},
    "silkie-optimized+cached_ref": {"image_once": True, "share_prompt": True, "precompute_ref_log_probs": True},
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks


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
    first_step_seconds: float | None = None  # the compile time of a compiling run is this minus step_seconds
    compiled_graphs: int | None = None  # compiled blocks: graphs compiled in the run
    eager_fallback: bool | None = None  # compiled blocks: dynamo gave up at its recompile limit (ran eager after)


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


class StepClock(TrainerCallback):
    """Wall time between consecutive optimizer-step ends (CUDA synchronised)."""

    def __init__(self):
        self.ends: list[float] = []
        self.start = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())


def timed_train(trainer: Any, clock: StepClock, device: str, warmup: int) -> tuple[list[float], float]:
    """Train, and return the step times after `warmup` steps and the peak memory."""
    with PeakMemory(device) as memory:
        trainer.train()
    times = [b - a for a, b in zip(clock.ends[warmup:], clock.ends[warmup + 1 :])]
    return times, memory.peak


def first_step_seconds(clock: StepClock) -> float:
    """Wall time of the first optimizer step (it carries compilation, when a lever compiles)."""
    return clock.ends[0] - clock.start if clock.ends else float("nan")


def peak_tflops(device: str, override: float | None) -> float | None:
    """Dense bf16 peak of the device (None on CPU unless given)."""
    if override:
        return override
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((value for key, value in PEAK_TFLOPS.items() if key in name), None)


def synthetic_pairs(count: Any, n: int, question: int, answer: int, image_px: int, seed: int = 0) -> list[dict]:
    """`n` pairs with random `image_px`-square pictures, ~`question`-token questions and ~`answer`-token answers
    (`count(text)`: its tokens)."""
    from silkie.dev.tiny_qwen_vl import demo_corpus

    rng = np.random.default_rng(seed)
    words = " ".join(demo_corpus(60)).split()

    def text(tokens: int) -> str:
        out: list[str] = []
        while count(" ".join(out)) < tokens:
            out.extend(rng.choice(words, size=8).tolist())
        return " ".join(out)

    pairs = []
    for i in range(n):
        pixels = rng.integers(0, 256, (image_px, image_px, 3), dtype=np.uint8)
        pairs.append({"prompt_id": f"bench-{i}", "image": Image.fromarray(pixels, "RGB"), "prompt": text(question),
                      "chosen": text(answer), "rejected": text(answer)})  # fmt: skip
    return pairs


class MemoryStore:
    """An image store over pictures in memory (the synthetic pairs' images, by prompt id)."""

    def __init__(self, images: dict[str, Image.Image]):
        self.images = images

    def open(self, key: str) -> Image.Image:
        return self.images[key].copy()


def pair_tokens(codec: Any, processor: Any, pairs: list[dict]) -> float:
    """Mean distinct tokens per pair (prompt with its image tokens once + both answers)."""
    sample = pairs[: min(8, len(pairs))]
    processed = processor([p["image"] for p in sample])
    extra = getattr(processed, "tokens_per_image", None)  # a marker the collator expands (else the span is inline)
    total = 0
    for index, pair in enumerate(sample):
        span = 0 if extra is None else extra[index] if isinstance(extra[index], int) else len(extra[index])
        total += len(codec.prompt_ids(pair["prompt"], "x")) + max(span - 1, 0)
        total += len(codec.answer_ids(pair["chosen"])) + len(codec.answer_ids(pair["rejected"]))
    return total / len(sample)


def bench_recipe(
    name: str, family: str, folder: Path, batch_size: int, steps: int, args: Any, levers: dict | None = None
) -> Recipe:
    """The recipe of one of our runs: LoRA r`args.lora_r` (alpha 16, dropout as TRL's default: off), the run's dpo
    switches plus its `levers` (section -> keys, `bench_levers`), `steps` optimizer steps at `batch_size`, nothing
    saved or logged."""
    levers = levers or {}
    model = {"path": str(folder), "family": family, "dtype": args.dtype, "attn_implementation": args.attn}
    if family in QWEN_HF_FAMILIES:
        model["min_pixels"] = model["max_pixels"] = args.image_px * args.image_px
    dpo = {"beta": 0.1, "max_length": 4096, "logps_chunk_size": args.chunk_size, **OURS[name]}
    return recipe_from_dict(
        {
            "model": {**model, **levers.get("model", {})},
            "data": {"path": "synthetic benchmark pairs"},
            "lora": {"r": args.lora_r, "alpha": 16, "dropout": 0.05},
            "dpo": {**dpo, **levers.get("dpo", {})},
            "training": {
                "per_device_train_batch_size": batch_size,
                "per_device_eval_batch_size": batch_size,
                "max_steps": steps,
                "learning_rate": 1e-6,
                "bf16": args.dtype == "bf16",
                "gradient_checkpointing": not args.no_gradient_checkpointing,
                "report_to": "none",
                "save_strategy": "no",
                "eval_strategy": "no",
                "logging_steps": 10**6,
                "dataloader_num_workers": args.dataloader_workers,
                "seed": 0,
                "disable_tqdm": True,
                **levers.get("training", {}),
            },
            "launch": {"cpu": args.device == "cpu"},
        }
    )


@dataclass
class OurRun:
    """What one of our runs measured: step times, peak memory, reference precompute s/pair, FLOPs of one step
    (when counted), the first step's seconds, and, with compiled blocks, the graphs compiled and
    whether dynamo gave up on a block at its recompile limit (it then ran eager)."""

    times: list[float]
    peak: float
    precompute: float | None
    flops: float | None
    first_step: float
    compiled_graphs: int | None = None
    eager_fallback: bool | None = None


def run_ours(base_model: Any, recipe: Recipe, codec: Any, pairs: list[dict], out: Path, args: Any) -> OurRun:
    """One of our runs through `build_trainer`. A compiling run starts from an empty dynamo cache: it compiles its
    own graphs and no earlier run's variants count toward the recompile limit. Its first step carries the compile
    time of the training variants (the no-grad ones are compiled in the reference precompute, when cached; graphs
    inductor has on disk from an earlier process load faster), so `first step - step` is that run's lower bound."""
    from torch.utils.flop_counter import FlopCounterMode

    from silkie.data.build import PreparedData
    from silkie.data.formatting import tokenize_pairs
    from silkie.data.pairs import PairReport
    from silkie.models.kernels import CompileWatch, eager_blocks
    from silkie.train.build import build_trainer

    records = [{**p, "image": p["prompt_id"], "chosen_score": 1.0, "rejected_score": 0.0} for p in pairs]
    dataset = tokenize_pairs(records, codec).add_column("pair_index", list(range(len(pairs))))
    store = MemoryStore({p["prompt_id"]: p["image"] for p in pairs})
    data = PreparedData(train=dataset, eval=None, image_store=store, report=PairReport(source="benchmark"))
    clock = StepClock()
    compiling = recipe.model.compile_blocks
    if compiling:
        torch._dynamo.reset()
    watch = CompileWatch()
    built = build_trainer(
        recipe, out, bookkeeping=False, base_model=base_model, codec=codec, data=data, callbacks=(clock,)
    )
    trainer, precompute = built.trainer, None
    if recipe.dpo.precompute_ref_log_probs:  # once per run, before training (timed apart, as the recipe does it)
        start = time.perf_counter()
        trainer._reference_table("train")
        precompute = (time.perf_counter() - start) / len(pairs)
    times, peak = timed_train(trainer, clock, args.device, args.warmup)
    flops = None
    if getattr(args, "count_flops", False):  # compiled blocks counted eager: the same work, op by op
        rows = [trainer.train_dataset[i] for i in range(trainer.args.per_device_train_batch_size)]
        batch = trainer._prepare_inputs(trainer.data_collator(rows))  # collated here: no DataLoader workers to start
        models = [m for m in (trainer.model_wrapped, getattr(trainer, "ref_model", None)) if m is not None]
        try:
            with eager_blocks(*models), FlopCounterMode(display=False) as counter:
                trainer.training_step(trainer.model_wrapped, batch)
            flops = counter.get_total_flops()
        except torch.cuda.OutOfMemoryError:  # eager blocks can need more memory: the timed run stands, without FLOPs
            print("FLOP count: out of memory with the blocks eager; this run's TFLOP/pair and MFU are n/a", flush=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    run = OurRun(times, peak, precompute, flops, first_step_seconds(clock))
    if compiling:
        run.compiled_graphs, run.eager_fallback = watch.graphs(), watch.gave_up() > 0
    return run


def result_of(
    name: str, batch_size: int, run: OurRun | tuple[list[float], float], tokens: float,
    peak_tflop: float | None = None,
) -> BenchResult:  # fmt: skip
    """The measurement of one run, ours (`OurRun`) or TRL's (step times, peak memory; not FLOP-counted): median
    step time; MFU from our run's counted FLOPs of one step and the device's peak."""
    ours = run if isinstance(run, OurRun) else None
    times, peak = (ours.times, ours.peak) if ours else run
    flops = ours.flops if ours else None
    median = statistics.median(times)
    per_pair = flops / batch_size if flops else None
    return BenchResult(
        path=name,
        batch_size=batch_size,
        step_seconds=median,
        step_seconds_spread=max(times) - min(times),
        pairs_per_second=batch_size / median,
        tokens_per_second=tokens * batch_size / median,
        peak_memory_gib=peak / 2**30,
        tflop_per_pair=per_pair / 1e12 if per_pair else None,
        mfu=(flops / median / 1e12 / peak_tflop) if flops and peak_tflop else None,
        reference_precompute_seconds_per_pair=ours.precompute if ours else None,
        first_step_seconds=ours.first_step if ours else None,
        compiled_graphs=ours.compiled_graphs if ours else None,
        eager_fallback=ours.eager_fallback if ours else None,
    )


def record_failure(args: Any, name: str, batch_size: int, err: Exception) -> None:
    """Keep a run that failed (a lever this card or build cannot run, out of memory) as one line in
    `args.failures` (printed under the table, written to the JSON); the other runs go on."""
    message = str(err).strip().splitlines()[0] if str(err).strip() else ""
    line = f"{name} batch {batch_size}: {type(err).__name__}: {message}"[:400]
    print(f"FAILED {line}", flush=True)
    args.failures = [*getattr(args, "failures", []), line]


def release(model: Any) -> None:
    """Free a run's model before the next one is built."""
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
    for r in results:
        if r.compiled_graphs is not None and r.first_step_seconds is not None:
            compile_s = r.first_step_seconds - r.step_seconds
            first = f"first step {r.first_step_seconds:.1f} s, ~{compile_s:.1f} s compile, {r.compiled_graphs} graphs"
            if r.eager_fallback:
                first += "; RECOMPILE LIMIT HIT: blocks ran eager after it"
            lines.append(f"\n{r.path} (batch {r.batch_size}): {first}")
    cached = [r for r in results if r.reference_precompute_seconds_per_pair is not None]
    for r in cached:
        per_pair = r.reference_precompute_seconds_per_pair * 1e3
        lines.append(f"\nreference precompute (batch {r.batch_size}): {per_pair:.1f} ms/pair, once per run")
    return "\n".join(lines)


def results_json(results: list[BenchResult], meta: dict) -> str:
    """JSON report with the run's settings."""
    return json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=2)


def save_report(args: Any, results: list[BenchResult]) -> None:
    """Write `args.out` (the results so far and the settings, failures included); called after every run, so a
    run cut short by a time limit keeps what it measured."""
    if not getattr(args, "out", None):
        return
    meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out.write_text(results_json(results, meta))
