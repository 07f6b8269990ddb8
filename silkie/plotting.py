"""Training-curve figure from a run's `metrics.jsonl` (loss, reward accuracy, margins, rewards; train and eval)."""

from __future__ import annotations

import json
from pathlib import Path

PANELS = (
    ("loss", "loss"),
    ("rewards/accuracies", "reward accuracy"),
    ("rewards/margins", "reward margin"),
    ("rewards/chosen", "chosen reward"),
    ("rewards/rejected", "rejected reward"),
)


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a metrics.jsonl file (one JSON object per line)."""
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON record ({err})") from err
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric."""
    points = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
    return [p[0] for p in points], [float(p[1]) for p in points]


def plot_metrics(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write `training_curves.png` (or `out`) for the run in `run_dir`; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics}: no metrics file (is {run_dir} a Silkie run directory?)")
    records = read_metrics(metrics)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
    for ax, (key, title) in zip(axes, PANELS):
        for prefix, style in (("", "-"), ("eval_", "o--")):
            steps, values = series(records, prefix + key)
            if steps:
                ax.plot(steps, values, style, label="eval" if prefix else "train")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    target = Path(out) if out else run_dir / "training_curves.png"
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return target
