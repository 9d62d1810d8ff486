"""The built-in tasks, by name: what ``dopd train --task NAME`` and ``dopd compare --task NAME`` read.

The table names each task's module, imported only when the task is used, so that reading the names
(``dopd --help``, config validation) loads no model code. Task modules never import ``dopd.config``:
the config reads this registry, the registry loads the tasks.
"""

from __future__ import annotations

import importlib
from typing import Any

#: name -> (module defining ``TASK``, one-line summary)
TASKS: dict[str, tuple[str, str]] = {
    "digit_sum": ("dopd.tasks.digit_sum", "add digits mod 10 in any order; the hint is one worked order "
                                          "(a real privilege illusion)"),
    "chain": ("dopd.tasks.chain", "a counted chain of +a mod 10 steps; every hint step is learnable skill"),
}
#: The task ``dopd train`` runs when no task, student, teacher or data is given.
DEFAULT_TASK = "digit_sum"
#: Sizes every built-in task has: full (the real run), small (quick looks), tiny (seconds: tests).
TASK_SIZES = ("full", "small", "tiny")


def task_names() -> tuple[str, ...]:
    """The registered task names."""
    return tuple(TASKS)


def get_task(name: str | None) -> Any:
    """The task object (a ``dopd.tasks.base.BuiltinTask``) registered as ``name`` (None: the default)."""
    name = name or DEFAULT_TASK
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return importlib.import_module(TASKS[name][0]).TASK


def task_defaults(name: str | None, size: str = "full") -> dict[str, Any]:
    """The TrainConfig fields task ``name`` sets for its tiny models (a plain mapping: no config import)."""
    return dict(get_task(name).train_defaults(size))
