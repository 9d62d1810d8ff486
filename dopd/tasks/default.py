"""The embedded default run: ``dopd train`` with no student, teacher or data (kept for old imports).

The built-in tasks live in ``dopd.tasks.registry`` (``digit_sum`` is the default, ``chain`` the other);
these two functions are the registry's default task seen through a TrainConfig.
"""

from __future__ import annotations

from typing import Any, Callable

from dopd.config import TrainConfig, apply_overrides
from dopd.tasks.registry import get_task, task_defaults


def _chain_specs() -> dict[str, dict[str, Any]]:
    from dopd.tasks.chain import TASK as CHAIN

    return {name: {"teacher": size.teacher, "student": size.student} for name, size in CHAIN.sizes.items()}


#: The chain task's model sizes by task size (``SPECS["tiny"]["teacher"]``), as before the registry.
SPECS = _chain_specs()


def default_task_config(task: str | None = None, size: str = "full") -> TrainConfig:
    """TrainConfig with the defaults of built-in task ``task`` (None: the default task)."""
    return apply_overrides(TrainConfig(task=task), task_defaults(task, size))


def prepare_default_task(config: TrainConfig, log: Callable[[str], None] = print) -> tuple[TrainConfig, dict[str, Any]]:
    """Build (or load) the task's models, write its data; see ``dopd.tasks.base.BuiltinTask.prepare``."""
    return get_task(config.task).prepare(config, log)
