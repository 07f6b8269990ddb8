"""`silkie evaluate --run RUN --tasks mme,pope,...`: lmms-eval benchmarks of the base model and the DPO model side by
side, written to RUN/benchmarks/ as results.json, table.md (with the paper's Qwen-VL-Chat / Silkie rows where the
task and metric match) and chart.png, plus each model's per-sample answers.

A LoRA run is loaded once: the base is the same model with the adapter disabled. A full fine-tuning run's
checkpoint is evaluated beside its base checkpoint. Tasks judged by a GPT (MM-Vet) read their endpoint from
`JudgeEndpoint` (an OpenAI-compatible URL, model and API-key variable)."""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from silkie.run_dir import BENCH_DIR
from silkie.tools.cli import ToolError, require_dir

MODELS = ("base", "dpo")
# arXiv 2312.10665 (Qwen-VL-Chat, Silkie); MME perception/cognition are the +6.9% / +9.5% of its abstract, MM-Vet's
# Silkie score is the paper's 49.9. MMHal-Bench (Silkie 3.02) is not a task of lmms-eval 0.7.3.
PAPER_ROWS: dict[tuple[str, str], tuple[float | None, float]] = {
    ("mme", "mme_perception_score"): (1440.5, 1539.6),
    ("mme", "mme_cognition_score"): (362.5, 397.1),
    ("mmvet", "gpt_eval_score"): (None, 49.9),
}
INSTALL_HINT = "pip install -e '.[eval]' (see the README's Benchmarks section)"


@dataclass(frozen=True)
class JudgeEndpoint:
    """The OpenAI-compatible endpoint of GPT-judged tasks."""

    url: str
    model: str
    key_env: str = "OPENAI_API_KEY"

    def environment(self) -> dict[str, str]:
        """The variables lmms-eval's judge reads (set before its tasks are imported)."""
        return {
            "API_TYPE": "openai",
            "OPENAI_API_URL": self.url,
            "OPENAI_API_KEY": os.environ.get(self.key_env, "EMPTY"),
            "MODEL_VERSION": self.model,
        }


def task_metrics(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of lmms-eval's `results` (its `metric,filter` keys; stderr left out)."""
    metrics: dict[str, dict[str, float]] = {}
    for task, values in results.items():
        for key, value in values.items():
            metric, _, filtered = key.partition(",")
            if not filtered or "_stderr" in metric or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name = metric if filtered == "none" else f"{metric} ({filtered})"
            metrics.setdefault(task, {})[name] = float(value)
    return metrics


def table_rows(metrics: dict[str, dict[str, dict[str, float]]]) -> list[dict[str, Any]]:
    """One row per (task, metric): base, dpo, their difference, and the paper's pair where it reports one."""
    rows = []
    base, dpo = metrics.get("base", {}), metrics.get("dpo", {})
    for task in sorted(set(base) | set(dpo)):
        for metric in sorted(set(base.get(task, {})) | set(dpo.get(task, {}))):
            b, d = base.get(task, {}).get(metric), dpo.get(task, {}).get(metric)
            paper = PAPER_ROWS.get((task, metric), (None, None))
            rows.append(
                {"task": task, "metric": metric, "base": b, "dpo": d,
                 "delta": d - b if b is not None and d is not None else None,
                 "paper_qwen_vl_chat": paper[0], "paper_silkie": paper[1]}
            )  # fmt: skip
    return rows


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}" if abs(value) < 10 else f"{value:.1f}"


def format_markdown(rows: Sequence[dict[str, Any]], title: str) -> str:
    """The table as markdown (paper columns only when a row has them)."""
    paper = any(row["paper_silkie"] is not None for row in rows)
    head = ["task", "metric", "base", "DPO", "Δ"] + (["paper Qwen-VL-Chat", "paper Silkie"] if paper else [])
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["task"], row["metric"], *(_cell(row[k]) for k in ("base", "dpo", "delta"))]
        cells += [_cell(row["paper_qwen_vl_chat"]), _cell(row["paper_silkie"])] if paper else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_chart(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """One bar panel per (task, metric): base vs DPO (and the paper's pair beside them when it has one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(rows))
    lines = (len(rows) + columns - 1) // columns
    figure, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.4 * lines), squeeze=False)
    for ax in axes.flat[len(rows) :]:
        ax.set_visible(False)
    for ax, row in zip(axes.flat, rows):
        bars = [("base", row["base"], "#8c8c8c"), ("DPO", row["dpo"], "#1f77b4")]
        if row["paper_silkie"] is not None:
            bars += [
                ("paper\nQwen-VL-Chat", row["paper_qwen_vl_chat"], "#d9d9d9"),
                ("paper\nSilkie", row["paper_silkie"], "#aec7e8"),
            ]
        labels = [label for label, value, _ in bars if value is not None]
        values = [value for _, value, _ in bars if value is not None]
        ax.bar(labels, values, color=[colour for _, value, colour in bars if value is not None])
        for x, value in enumerate(values):
            ax.annotate(_cell(value), (x, value), ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{row['task']}: {row['metric']}", fontsize=9)
        ax.set_ylabel("score")
        ax.grid(axis="y", alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


PAIRED_TASKS = ("mme", "silkie_shapes")  # MME scoring: each picture's two questions together (accuracy+)


def check_limit(tasks: Sequence[str], limit: float | None) -> None:
    """`--limit` keeps the first documents of each task: MME-style tasks need an even whole number of them, else
    lmms-eval's aggregation fails after every answer was generated."""
    paired = [t for t in tasks if t in PAIRED_TASKS]
    if limit is None or not paired:
        return
    if limit < 1 or limit != int(limit) or int(limit) % 2:
        example = 2 * math.ceil(limit / 2) if limit >= 1 else 10
        raise ToolError(
            f"--limit {_number(limit)}: {', '.join(paired)} score each picture's two questions together (MME's "
            f"accuracy+); give an even whole number of documents, e.g. --limit {example}"
        )


def limit_note(limit: float | None) -> str:
    """What a table title says of a `--limit` look (nothing for a full benchmark)."""
    return "" if limit is None else f" (--limit {_number(limit)}: the first documents of each task, a quick look)"


def bench_dir(run_dir: Path, limit: float | None) -> Path:
    """Where the results go: `benchmarks/`, or for a `--limit` look `benchmarks-limit<N>/` (never over a full
    benchmark)."""
    if limit is None:
        return run_dir / BENCH_DIR
    return run_dir / f"{BENCH_DIR}-limit{_number(limit)}"


def _number(limit: float) -> str:
    return str(int(limit)) if limit == int(limit) else str(limit)


def _check_tasks(task_manager: Any, tasks: Sequence[str]) -> None:
    known = set(task_manager.all_tasks)
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; `lmms-eval tasks list` lists them"
            raise ToolError(f"--tasks: {task!r} is not an lmms-eval task{hint}")


def _offline() -> bool:
    variables = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes") for name in variables)


def _dataset_cached(dataset: str) -> bool:
    """Whether a hub dataset is in the hub cache (a snapshot) or in the datasets cache (a prepared copy)."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(dataset, repo_type="dataset", local_files_only=True)
        return True
    except Exception:  # not in the hub cache
        pass
    from datasets import config
    from datasets.naming import camelcase_to_snakecase

    owner, _, name = dataset.partition("/")
    prepared = {f"{owner}___{spelling}".lower() for spelling in (name, camelcase_to_snakecase(name))}  # as datasets
    cache = Path(config.HF_DATASETS_CACHE)
    return cache.is_dir() and any(entry.name.lower() in prepared for entry in cache.iterdir())


def check_datasets_offline(task_manager: Any, tasks: Sequence[str]) -> None:
    """Offline (`HF_HUB_OFFLINE`/`HF_DATASETS_OFFLINE`), a `ToolError` naming each task whose hub dataset is in no
    local cache, with the command that fetches it where there is a network: before a model is loaded, instead of
    lmms-eval's traceback after it."""
    import re

    if not _offline():
        return
    missing = []
    for task in tasks:
        yaml_path = (task_manager.task_index.get(task) or {}).get("yaml_path")
        text = Path(yaml_path).read_text() if isinstance(yaml_path, str) and Path(yaml_path).is_file() else ""
        match = re.search(r"^dataset_path:\s*[\"']?([\w.-]+/[\w.-]+)[\"']?\s*$", text, flags=re.M)
        if match and not Path(match.group(1)).exists() and not _dataset_cached(match.group(1)):
            token = " (with HF_TOKEN set: it is gated)" if re.search(r"^\s+token:\s*true", text, re.M | re.I) else ""
            missing.append(f"{task} needs {match.group(1)}: huggingface-cli download --repo-type dataset "
                           f"{match.group(1)}{token}")  # fmt: skip
    if missing:
        raise ToolError(f"--tasks offline, and not in the local caches: {'; '.join(missing)}")


def _write_samples(out: Path, model: str, samples: dict[str, list[dict]]) -> None:
    for task, rows in samples.items():
        with (out / f"samples_{model}_{task}.jsonl").open("w", encoding="utf-8") as handle:
            for row in rows:
                kept = {"doc_id": row["doc_id"], "target": row.get("target"), "prompt": row["arguments"][0]}
                kept["response"] = row["filtered_resps"][0] if row.get("filtered_resps") else None
                kept.update({k: v for k, v in row.items() if k not in kept and k not in ("doc", "arguments")})
                handle.write(json.dumps(kept, default=str) + "\n")


def run_benchmarks(
    run_dir: str | Path,
    tasks: Sequence[str],
    include_path: Sequence[str] = (),
    limit: float | None = None,
    batch_size: int = 8,
    device: str = "auto",
    adapter_dir: str | Path | None = None,
    model_dir: str | Path | None = None,
    judge: JudgeEndpoint | None = None,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate the run's base and DPO model on lmms-eval `tasks`; writes and returns {rows, metrics, files}."""
    from silkie.tools.evaluate import locate_run

    run_dir = require_dir(run_dir, "run directory")
    check_limit(tasks, limit)
    _, model_dir, adapter_dir, lora = locate_run(run_dir, adapter_dir, model_dir)
    if judge is not None:
        os.environ.update(judge.environment())
    try:
        from lmms_eval.evaluator import simple_evaluate
        from lmms_eval.tasks import TaskManager

        from silkie.tools.lmms_model import SilkieLMM
    except ImportError as err:
        raise ToolError(f"--tasks needs lmms-eval ({err}): {INSTALL_HINT}") from err
    task_manager = TaskManager(include_path=[str(Path(p).resolve()) for p in include_path] or None, model_name="silkie")
    _check_tasks(task_manager, tasks)
    check_datasets_offline(task_manager, tasks)
    out = Path(out_dir) if out_dir else bench_dir(run_dir, limit)
    out.mkdir(parents=True, exist_ok=True)
    options = dict(device=device, batch_size=batch_size)
    dpo = SilkieLMM(path=str(model_dir), adapter=str(adapter_dir), **options) if lora else None
    metrics: dict[str, dict] = {}
    title = f"{run_dir.name}: base vs DPO{limit_note(limit)}"
    result = {"run": str(run_dir), "model": str(model_dir), "adapter": str(adapter_dir), "tasks": list(tasks)}
    result["limit"] = limit
    for name in MODELS:
        if lora:
            model, dpo.use_adapter = dpo, name == "dpo"
        else:  # a full fine-tuning run: its checkpoint, beside the base checkpoint
            model = SilkieLMM(path=str(model_dir if name == "base" else adapter_dir), **options)
        evaluated = simple_evaluate(
            model=model, tasks=list(tasks), task_manager=task_manager, batch_size=batch_size, limit=limit,
            log_samples=True,
        )  # fmt: skip
        metrics[name] = task_metrics(evaluated["results"])
        _write_samples(out, name, evaluated.get("samples") or {})
        result.update(metrics=metrics, rows=table_rows(metrics))  # written after each model: nothing finished is lost
        (out / "results.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if not result["rows"]:
        raise ToolError(f"tasks {', '.join(tasks)} reported no numeric metric (see {out}/samples_*.jsonl)")
    (out / "table.md").write_text(format_markdown(result["rows"], title), encoding="utf-8")
    plot_chart(result["rows"], out / "chart.png", title)
    result["files"] = {
        kind: str(out / name)
        for kind, name in (("json", "results.json"), ("table", "table.md"), ("chart", "chart.png"))
    }
    return result
