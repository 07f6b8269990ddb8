"""Training-curve figure from a run's `metrics.jsonl` (loss, reward accuracy, margins, rewards; train and eval)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from silkie.run_dir import METRICS_NAME, PLOT_NAME

PANELS = (
    ("loss", "loss"),
    ("rewards/accuracies", "reward accuracy"),
    ("rewards/margins", "reward margin"),
    ("rewards/chosen", "chosen reward"),
    ("rewards/rejected", "rejected reward"),
)
# shown when the run logged them (the vision-aware losses, the held-out image diagnostics)
OPTIONAL_PANELS = (("rewards/imageless_accuracies", "reward accuracy, corrupted image"),)


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a metrics.jsonl file (one JSON object per line); a line that a killed run left half-written is
    skipped with a warning."""
    records, broken = [], []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                broken.append(number)
    if broken:
        lines = f"{len(broken)} line(s) that are not JSON records (first: line {broken[0]})"
        warnings.warn(f"{path}: skipped {lines}", stacklevel=2)
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric in step order; a step logged again after a resume keeps its latest value."""
    points = {r["step"]: r[key] for r in records if key in r and r[key] is not None}
    steps = sorted(points)
    return steps, [float(points[step]) for step in steps]


def plot_metrics(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write `training_curves.png` (or `out`) for the run in `run_dir`; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics = run_dir / METRICS_NAME
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics}: no metrics file (is {run_dir} a Silkie run directory?)")
    records = read_metrics(metrics)
    logged = {name for record in records for name in record}
    panels = PANELS + tuple(p for p in OPTIONAL_PANELS if p[0] in logged or f"eval_{p[0]}" in logged)
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (key, title) in zip(axes, panels):
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
    target = Path(out) if out else run_dir / PLOT_NAME
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return target
