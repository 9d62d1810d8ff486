"""What every built-in task provides, and the preparation they share.

A built-in task is a problem generator with a fixed held-out split, a tiny teacher and student trained
in code on its worked solutions, and the TrainConfig defaults that suit them. ``prepare`` turns a
TrainConfig that names no student, teacher or data into one that does: it trains (or loads from the
cache) both models, writes the data files into ``OUTPUT_DIR/data/`` (``train.jsonl`` for distillation,
``eval.jsonl`` for the held-out split, plus one file per extra split such as ``ood.jsonl``) and measures
the teacher's accuracy without the hint for reference.

This module imports neither ``dopd.config`` nor ``dopd.trainer``: the config reads the registry, and
the registry loads tasks, so a task must not import the config back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from dopd.data import PromptTemplate, Record, write_records
from dopd.tasks.models import ModelSpec, Sampler, trained_model

#: The split ``eval_data`` points at; other splits are reported by ``dopd compare`` only.
HELDOUT = "heldout"
#: What ``--task-size tiny`` changes in the run itself: two steps of two prompts, short responses.
TINY_RUN = dict(max_steps=2, prompts_per_step=2, num_generations=2, max_new_tokens=12, eval_every=1)


@dataclass(frozen=True)
class TaskSize:
    """One size of a task: its two models, the number of distillation prompts, and how many records of
    each evaluation split are scored (a prefix of the fixed split, so smaller sizes score a subset)."""

    teacher: ModelSpec
    student: ModelSpec
    train: int
    evals: Mapping[str, int] = field(default_factory=dict)


def split_bucket(key: str, buckets: int) -> int:
    """A stable bucket in ``[0, buckets)`` for ``key`` (sha256, so independent of Python's hash seed)."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) % buckets


def template_of(config: Any) -> PromptTemplate:
    """The PromptTemplate a TrainConfig's template fields describe."""
    return PromptTemplate(student_template=config.student_template, privileged_template=config.privileged_template,
                          response_prefix=config.response_prefix, use_chat_template=config.use_chat_template)


class BuiltinTask:
    """Base class of the built-in tasks. Subclasses set the class attributes and the four methods."""

    #: Registry name (``dopd train --task NAME``).
    name: str = ""
    #: Bump when the problems, the hints or the models' recipe change: part of the models' cache key.
    version: int = 1
    #: ``full`` (the real run), ``small`` (quick looks), ``tiny`` (seconds: tests).
    sizes: Mapping[str, TaskSize] = {}
    answer_marker: str = "####"

    @property
    def cache_key(self) -> str:
        """Name and version: prefixes the cached models' directory names."""
        return f"{self.name}-v{self.version}"

    #: TrainConfig fields that suit this task's models (flags and YAML still override them).
    defaults: Mapping[str, Any] = {}

    def train_defaults(self, size: str = "full") -> dict[str, Any]:
        """``defaults``, shrunk to a few seconds for the ``tiny`` size (tests)."""
        return {**self.defaults, **(TINY_RUN if size == "tiny" else {})}

    def sampler(self, role: str) -> Sampler:
        """``sample(n, seed)`` of the worked problems ``role`` ("teacher" or "student") is trained on;
        never problems of a held-out split."""
        raise NotImplementedError

    def train_records(self, n: int, seed: int) -> list[dict[str, str]]:
        """``n`` distillation records (prompt, privileged, answer), none from a held-out split."""
        raise NotImplementedError

    def eval_splits(self) -> dict[str, list[dict[str, str]]]:
        """Every evaluation split in full, in a fixed order: ``heldout`` first (the task's test set),
        then extras such as ``ood`` (harder than anything trained on) or ``prior`` (a skill the student
        had before distillation)."""
        raise NotImplementedError

    def check_answer(self, response: str, answer: str) -> bool:
        """Whether a response's final answer is right (default: exact match after the marker)."""
        from dopd.evaluate import exact_match

        return exact_match(response, answer, self.answer_marker)

    # ------------------------------------------------------------------ shared preparation
    def size(self, name: str) -> TaskSize:
        """The TaskSize called ``name``, or a ValueError naming the known sizes."""
        if name not in self.sizes:
            raise ValueError(f"task {self.name!r} has no size {name!r}; known: {sorted(self.sizes)}")
        return self.sizes[name]

    def sized_splits(self, size: str) -> dict[str, list[dict[str, str]]]:
        """The evaluation splits cut to ``size``'s counts (a prefix of each fixed split)."""
        counts = self.size(size).evals
        return {name: rows[: counts.get(name, len(rows))] for name, rows in self.eval_splits().items()
                if counts.get(name, len(rows)) > 0}

    def models(self, config: Any, log: Callable[[str], None] = print) -> tuple[str, str]:
        """Paths of the trained (or cached) teacher and student for ``config.task_size``."""
        from dopd.tasks.tokenizer import build_char_tokenizer

        tokenizer = build_char_tokenizer()
        template = template_of(config)
        spec = self.size(config.task_size)
        teacher = trained_model("teacher", spec.teacher, tokenizer, template, config.cache_dir,
                                self.sampler("teacher"), self.cache_key, log)
        student = trained_model("student", spec.student, tokenizer, template, config.cache_dir,
                                self.sampler("student"), self.cache_key, log)
        return teacher, student

    def write_data(self, output_dir: str, size: str) -> dict[str, str]:
        """Write ``data/train.jsonl`` and one file per evaluation split (``eval.jsonl`` for the held-out
        split); return ``{"train": path, split: path, ...}``."""
        data_dir = os.path.join(output_dir, "data")
        os.makedirs(data_dir, exist_ok=True)
        paths = {"train": os.path.join(data_dir, "train.jsonl")}
        write_records(self.train_records(self.size(size).train, seed=1), paths["train"])
        for name, rows in self.sized_splits(size).items():
            paths[name] = os.path.join(data_dir, "eval.jsonl" if name == HELDOUT else f"{name}.jsonl")
            write_records(rows, paths[name])
        return paths

    def prepare(self, config: Any, log: Callable[[str], None] = print,
                teacher_reference: bool = True) -> tuple[Any, dict[str, Any]]:
        """Models, data files and reference numbers for ``config`` (a TrainConfig with no student,
        teacher or data); returns the config pointing at them and ``{"teacher_accuracy", "paths"}``."""
        teacher, student = self.models(config, log)
        paths = self.write_data(config.output_dir, config.task_size)
        out = dataclasses.replace(config, student=student, teacher=teacher, data=paths["train"],
                                  eval_data=paths[HELDOUT])
        reference: dict[str, Any] = {"paths": paths}
        if teacher_reference:
            acc = accuracy(teacher, out, self, paths[HELDOUT])
            reference["teacher_accuracy"] = acc
            log(f"teacher accuracy without the hint: {acc:.3f} (held-out split)")
        return out, reference


def accuracy(model: Any, config: Any, task: Optional[BuiltinTask], records: Any, hinted: bool = False) -> float:
    """Greedy accuracy of ``model`` (a path or a loaded model) on ``records`` (a path or rows), with the
    student's context (``hinted=True``: the privileged context, to measure what the hint is worth)."""
    import torch

    from dopd.data import load_records
    from dopd.evaluate import evaluate
    from dopd.modeling import load_causal_lm
    from dopd.tasks.tokenizer import build_char_tokenizer

    if isinstance(model, str):
        model = load_causal_lm(model, "float32", torch.device("cpu"), trainable=False)
    recs: Sequence[Record] = load_records(records, require_privileged=hinted)
    template = template_of(config)
    if hinted:  # the privileged context, rendered and then shown as the prompt
        recs = [Record(prompt=template.privileged_template.format(prompt=r.prompt, privileged=r.privileged),
                       privileged="", answer=r.answer) for r in recs]
        template = dataclasses.replace(template, student_template="{prompt}")
    checker = task.check_answer if task is not None else None
    return evaluate(model, build_char_tokenizer(), template, recs, max_new_tokens=config.max_new_tokens,
                    batch_size=config.eval_batch_size, marker=config.answer_marker, checker=checker)["accuracy"]
