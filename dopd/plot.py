"""``dopd plot DIR``: route fractions, loss and evaluation accuracy over steps, from metrics.jsonl."""

from __future__ import annotations

import os
from typing import Optional

from dopd.metrics import read_metrics

ROUTE_NAMES = ("LH", "LL", "HT", "HS")


def plot_run(output_dir: str, out_path: Optional[str] = None) -> str:
    """Draw three panels (route fractions, loss, eval accuracy) into a PNG; return its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: works on machines without a display
    import matplotlib.pyplot as plt

    rows = read_metrics(output_dir)
    if not rows:
        raise FileNotFoundError(f"no metrics in {os.path.join(output_dir, 'metrics.jsonl')}")
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval/accuracy" in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = [r["step"] for r in train]
    for name in ROUTE_NAMES:
        key = f"frac/{name}"
        if any(key in r for r in train):
            axes[0].plot(steps, [r.get(key, float("nan")) for r in train], label=name)
    axes[0].set(title="route fractions", xlabel="step", ylim=(0, 1))
    axes[0].legend()
    axes[1].plot(steps, [r["loss"] for r in train], label="loss")
    for name in ROUTE_NAMES:
        key = f"loss/{name}"
        if any(key in r for r in train):
            axes[1].plot(steps, [r.get(key, float("nan")) for r in train], label=f"loss/{name}", alpha=0.5)
    axes[1].set(title="loss", xlabel="step")
    axes[1].legend()
    if evals:
        axes[2].plot([r["step"] for r in evals], [r["eval/accuracy"] for r in evals], marker="o")
    axes[2].set(title="eval accuracy" + ("" if evals else " (no evaluation)"), xlabel="step", ylim=(0, 1))
    fig.tight_layout()
    path = out_path or os.path.join(output_dir, "training.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
