"""Per-step metrics: ``DIR/metrics.jsonl`` always, TensorBoard or W&B when installed and asked for."""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Optional

METRICS_FILE = "metrics.jsonl"


def read_metrics(output_dir: str) -> list[dict[str, Any]]:
    """All rows of ``metrics.jsonl`` (each has ``step``)."""
    path = os.path.join(output_dir, METRICS_FILE)
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


class MetricsLogger:
    """Append rows to metrics.jsonl; mirror them to TensorBoard / W&B.

    On resume, rows after the resumed step are dropped first: they came from the part of the
    interrupted run that the checkpoint does not contain and will be produced again.
    """

    def __init__(self, output_dir: str, report_to: str = "none", resume_step: Optional[int] = None,
                 run_config: Optional[dict[str, Any]] = None) -> None:
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, METRICS_FILE)
        if resume_step is None:
            open(self.path, "w").close()
        else:
            kept = [r for r in read_metrics(output_dir) if r.get("step", 0) <= resume_step]
            with open(self.path, "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in kept)
        self._tb = self._wandb = None
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            except ImportError:
                warnings.warn("report_to=tensorboard but tensorboard is not installed; logging to metrics.jsonl only")
        elif report_to == "wandb":
            try:
                import wandb

                self._wandb = wandb.init(project="dopd", dir=output_dir, config=run_config, resume="allow")
            except ImportError:
                warnings.warn("report_to=wandb but wandb is not installed; logging to metrics.jsonl only")

    def log(self, step: int, values: dict[str, Any]) -> None:
        """Write one row ``{"step": step, **values}``."""
        row = {"step": step, **values}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        numeric = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def close(self) -> None:
        """Flush and close the mirrors."""
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
