"""The picture of a run, for MLflow's artifact view: training and validation loss, learning rate and throughput
against the optimizer step, drawn from metrics.jsonl (so a resumed run's plot covers all of its steps)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

from gptdist.telemetry.metrics_file import read_metrics

PLOT_FILE = "training_curves.png"


def _series(records: List[Dict], key: str) -> Tuple[List[int], List[float]]:
    points = [(int(r["step"]), float(r[key])) for r in records if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_run(metrics_path: Path, out: Path) -> Path:
    # matplotlib: slow to import, only where the plot is drawn
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    # ordering: pyplot picks its backend when imported, so after matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    loss, lr, speed = axes
    loss.plot(*_series(records, "loss"), label="training loss", linewidth=1)
    steps, val = _series(records, "val_loss")
    if steps:
        loss.plot(steps, val, "o-", label="validation loss", linewidth=1.5, markersize=3)
    loss.set_title("loss")
    loss.legend()
    lr.plot(*_series(records, "lr"), color="tab:green")
    lr.set_title("learning rate")
    lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    speed.plot(*_series(records, "tokens_per_s"), color="tab:purple")
    speed.set_title("tokens/s")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(metrics_path.parent.name)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
