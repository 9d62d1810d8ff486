"""Checkpoints: the student (``save_pretrained``) plus optimizer, scheduler and RNG state.

Layout: ``DIR/checkpoint-<step>/`` holds the student's weights and tokenizer, and ``trainer_state.pt``
with the step, optimizer, scheduler and every RNG the step consumes (torch CPU/CUDA, Python, NumPy).
Restoring all of them makes a resumed run take the same samples and the same updates as an
uninterrupted one. The directory is written under a temporary name and renamed, so a crash mid-save
never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from typing import Any, Optional

import torch

STATE_FILE = "trainer_state.pt"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> dict[str, Any]:
    """Every RNG state a training step reads."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def save_checkpoint(output_dir: str, step: int, model: Any, tokenizer: Any, optimizer: Any, scheduler: Any,
                    keep: int, extra: Optional[dict[str, Any]] = None) -> str:
    """Write ``checkpoint-<step>`` and delete all but the newest ``keep`` checkpoints; return its path."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng_state(), **(extra or {})}, os.path.join(tmp, STATE_FILE))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _NAME.match(name)
        if m and os.path.isfile(os.path.join(output_dir, name, STATE_FILE)):
            found.append((int(m.group(1)), os.path.join(output_dir, name)))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def load_state(path: str) -> dict[str, Any]:
    """Read ``trainer_state.pt`` of a checkpoint (it holds Python RNG tuples, so not weights-only)."""
    return torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=False)
