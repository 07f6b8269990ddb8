"""Training-curve figure from a run's `metrics.jsonl` (loss, reward accuracy, margins, rewards; train and eval)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from silkie.run_dir import METRICS_NAME, PLOT_NAME

# (metric, title, y-axis label); accuracy panels get the 0.5 chance line
PANELS = (
    ("loss", "loss", "DPO loss"),
    ("rewards/accuracies", "reward accuracy", "share of pairs"),
    ("rewards/margins", "reward margin", "chosen - rejected"),
    ("rewards/chosen", "chosen reward", "beta x log-ratio"),
    ("rewards/rejected", "rejected reward", "beta x log-ratio"),
    ("learning_rate", "learning rate", "lr"),
)
# shown when the run logged them (the vision-aware losses, the held-out image diagnostics)
OPTIONAL_PANELS = (("rewards/imageless_accuracies", "reward accuracy, corrupted image", "share of pairs"),)
COLUMNS = 3  # a grid that stays legible at screen width


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


def build_figure(records: list[dict], title: str):
    """The figure: one panel per metric on a grid of COLUMNS, train lines and eval points, y labels, the chance
    line on accuracy panels, `title` on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logged = {name for record in records for name in record}
    panels = PANELS + tuple(p for p in OPTIONAL_PANELS if p[0] in logged or f"eval_{p[0]}" in logged)
    rows = -(-len(panels) // COLUMNS)
    fig, axes = plt.subplots(rows, COLUMNS, figsize=(4.2 * COLUMNS, 3.2 * rows), squeeze=False)
    for ax, (key, name, ylabel) in zip(axes.flat, panels):
        for prefix, style in (("", "-"), ("eval_", "o--")):
            steps, values = series(records, prefix + key)
            if steps:
                ax.plot(steps, values, style, label="eval" if prefix else "train")
        if key.endswith("accuracies"):
            ax.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="chance")
            ax.set_ylim(0, 1)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_metrics(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write `training_curves.png` (or `out`) for the run in `run_dir`, titled with the run's name; returns the
    path."""
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics = run_dir / METRICS_NAME
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics}: no metrics file (is {run_dir} a Silkie run directory?)")
    fig = build_figure(read_metrics(metrics), f"{run_dir.resolve().name}: DPO training")
    target = Path(out) if out else run_dir / PLOT_NAME
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return target
