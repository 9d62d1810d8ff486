"""Checkpoints: where they are, which are complete, and the RNG states they carry.

Writing and reading them (any number of ranks, ``torch.distributed.checkpoint``) is
``dopd.dist_checkpoint``'s job; its docstring describes the layout. A checkpoint counts as complete once
its ``trainer_state.pt`` exists: that file is written last, under a temporary directory name that is
renamed only when every rank has finished, so a crash mid-save never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import os
import random
import re
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


def seed_all(seed: int) -> None:
    """Seed every RNG :func:`rng_state` captures (torch CPU and CUDA, Python, NumPy)."""
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


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
    """Read ``trainer_state.pt`` of a checkpoint: step, world size, ``--parallel`` and the run's extra data
    (config, EMA counters). Optimizer, schedule and RNG are ``dopd.dist_checkpoint``'s to restore."""
    return torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=False)
