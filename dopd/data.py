"""Records, templates and the privileged context.

A record has ``prompt`` (what the student sees), ``privileged`` (the hint, shown only to the self and
teacher passes during training) and an optional ``answer`` (used by evaluation only, never shown to a
model). Records come from a JSON-lines file, a JSON list, a list of dicts or a ``datasets.Dataset``.

Contexts: the student context renders ``student_template`` (default ``"{prompt}"``), the self and
teacher contexts render ``privileged_template`` (default ``"{prompt}\\n\\n{privileged}"``). When the
tokenizer has a chat template, the rendered text becomes one user message and the chat template with
its generation prompt is applied -- the same template for teacher and student, so the only difference
between the contexts is the hint. Without a chat template ``response_prefix`` (default ``"\\n"``) is
appended so that the response is visibly separated from the prompt.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

REQUIRED_FIELDS = ("prompt", "privileged")


class DataError(ValueError):
    """A record or data source the trainer cannot use; the message names the record."""


@dataclass(frozen=True)
class Record:
    """One training or evaluation example."""

    prompt: str
    privileged: str
    answer: Optional[str] = None


def _check_record(raw: Any, where: str, require_privileged: bool, require_answer: bool = False) -> Record:
    """Validate one raw mapping and turn it into a :class:`Record`."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected an object with fields {REQUIRED_FIELDS}, got {type(raw).__name__}")
    required = (REQUIRED_FIELDS if require_privileged else ("prompt",)) + (("answer",) if require_answer else ())
    missing = [f for f in required if f not in raw or raw[f] is None]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}; each record needs {list(required)}")
    for name in ("prompt", "privileged", "answer"):
        if raw.get(name) is not None and not isinstance(raw[name], str):
            raise DataError(f"{where}: field {name!r} must be a string, got {type(raw[name]).__name__}")
    if not raw["prompt"].strip():
        raise DataError(f"{where}: empty prompt")
    answer = raw.get("answer")
    return Record(prompt=raw["prompt"], privileged=raw.get("privileged") or "", answer=answer)


def _read_file(path: str) -> list[Any]:
    """Read a ``.jsonl`` (one object per line) or ``.json`` (a list of objects) file."""
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    with open(path, encoding="utf-8") as fh:
        if path.endswith(".json"):
            try:
                rows = json.load(fh)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: not valid JSON ({err})") from None
            if not isinstance(rows, list):
                raise DataError(f"{path}: a .json data file must hold a list of records")
            return rows
        rows = []
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid JSON ({err})") from None
        return rows


def load_records(source: Any, require_privileged: bool = True, require_answer: bool = False) -> list[Record]:
    """Load and validate records from a path, a list of dicts or a ``datasets.Dataset``.

    Raises :class:`DataError` on a missing field, a non-string field, an empty prompt or no records;
    this runs before any model is loaded so that bad data fails in seconds.
    ``require_privileged=False`` is for evaluation data, which needs only ``prompt`` and ``answer``
    (``require_answer=True``: every record is scored).
    """
    if isinstance(source, (str, os.PathLike)):
        name, rows = str(source), _read_file(str(source))
    elif hasattr(source, "column_names") and hasattr(source, "__iter__"):
        # A datasets.Dataset: iterating yields dicts; checking the columns first gives one clear error.
        name, rows = "dataset", list(source)
    elif isinstance(source, Iterable):
        name, rows = "records", list(source)
    else:
        raise DataError(f"cannot read records from {type(source).__name__}")
    if not rows:
        raise DataError(f"{name}: no records")
    return [_check_record(r, f"{name}[{i}]", require_privileged, require_answer) for i, r in enumerate(rows)]


def write_records(records: Iterable[dict[str, Any] | Record], path: str) -> None:
    """Write records as JSON lines (the format :func:`load_records` reads)."""
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            row = r if isinstance(r, dict) else {k: v for k, v in r.__dict__.items() if v is not None}
            fh.write(json.dumps(row) + "\n")


@dataclass(frozen=True)
class PromptTemplate:
    """How the student and the privileged (self/teacher) contexts are rendered to text."""

    student_template: str = "{prompt}"
    privileged_template: str = "{prompt}\n\n{privileged}"
    response_prefix: str = "\n"
    use_chat_template: bool = True

    def __post_init__(self) -> None:
        for name in ("student_template", "privileged_template"):
            tpl = getattr(self, name)
            try:
                tpl.format(prompt="", privileged="")
            except (KeyError, IndexError) as err:
                raise DataError(f"{name} may only use {{prompt}} and {{privileged}}: {err}") from None
        if "{prompt}" not in self.student_template or "{prompt}" not in self.privileged_template:
            raise DataError("both templates must contain {prompt}")
        if "{privileged}" in self.student_template:
            raise DataError("student_template must not contain {privileged}: the student never sees the hint")

    def render(self, tokenizer: Any, record: Record, privileged: bool) -> str:
        """Return the full context text (chat template applied when the tokenizer has one)."""
        tpl = self.privileged_template if privileged else self.student_template
        text = tpl.format(prompt=record.prompt, privileged=record.privileged)
        if self.use_chat_template and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        return text + self.response_prefix

    def encode(self, tokenizer: Any, records: Sequence[Record], privileged: bool) -> list[list[int]]:
        """Token ids of each record's context (no padding; the passes pad and align)."""
        chat = self.use_chat_template and getattr(tokenizer, "chat_template", None)
        # A chat template already writes its own BOS; adding special tokens again would double it.
        texts = [self.render(tokenizer, r, privileged) for r in records]
        return [tokenizer(t, add_special_tokens=not chat)["input_ids"] for t in texts]
