"""The privileged prompts of the self and teacher passes, built from ``prompt`` and ``privileged_context``.

The dataset convention is TRL's SDFT one: a ``prompt`` column (text, or a list of chat messages) and a
``privileged_context`` column (text, or messages whose text is joined). The self and teacher see
``privileged_prompt_template.format(prompt=..., privileged_context=...)``: for a text prompt the whole
prompt; for a conversational prompt the content of its last user turn, earlier turns (a system prompt)
kept, so that the trainer's chat template is applied around it exactly as around the student's prompt.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

PROMPT, PRIVILEGED = "prompt", "privileged_context"


def check_columns(dataset: Any, name: str) -> None:
    """ValueError when ``dataset`` (a datasets.Dataset, or a dict of them) lacks ``prompt`` or ``privileged_context``.

    Streaming datasets whose columns are unknown until read are checked on their first batch instead.
    """
    if dataset is None:
        return
    if isinstance(dataset, dict):
        for key, part in dataset.items():
            check_columns(part, f"{name}[{key!r}]")
        return
    columns: Optional[Iterable[str]] = getattr(dataset, "column_names", None)
    if columns is None:
        return
    missing = [c for c in (PROMPT, PRIVILEGED) if c not in columns]
    if missing:
        raise ValueError(
            f"{name}: DOPDTrainer needs the columns 'prompt' and 'privileged_context' (TRL's SDFT convention), "
            f"but {missing} {'is' if len(missing) == 1 else 'are'} missing; columns: {sorted(columns)}. "
            "Use an empty string as privileged_context for examples without one."
        )


def context_text(context: Any) -> str:
    """The privileged context as text: a string as is, a list of messages as their text contents joined by newlines."""
    if isinstance(context, str):
        return context
    if isinstance(context, list) and all(isinstance(m, dict) for m in context):
        return "\n".join(t for t in (_message_text(m) for m in context) if t)
    raise ValueError(f"privileged_context must be a string or a list of chat messages, got {type(context).__name__}"
                     f" ({context!r:.80})")


def privileged_prompt(prompt: Any, context: Any, template: str) -> Any:
    """The self/teacher prompt for one example; the student's ``prompt`` unchanged when the context is empty."""
    text = context_text(context)
    if not text:
        return prompt
    if isinstance(prompt, str):
        return template.format(prompt=prompt, privileged_context=text)
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
        last = prompt[-1]
        if last.get("role") != "user":
            raise ValueError(f"prompt: a conversational prompt must end with a user turn to take the privileged "
                             f"context, but its last message has role {last.get('role')!r}")
        content = template.format(prompt=_message_text(last), privileged_context=text)
        return list(prompt[:-1]) + [{**last, "content": content}]
    raise ValueError(f"prompt must be a string or a list of chat messages, got {type(prompt).__name__}")


def privileged_prompts(examples: list[dict[str, Any]], template: str) -> list[Any]:
    """``privileged_prompt`` for each example of a batch (ValueError naming the column when one is missing)."""
    out = []
    for i, example in enumerate(examples):
        if PRIVILEGED not in example or example[PRIVILEGED] is None:
            raise ValueError(f"privileged_context: example {i} of the batch has no privileged_context (use an empty "
                             "string for an example without one)")
        out.append(privileged_prompt(example[PROMPT], example[PRIVILEGED], template))
    return out


def _message_text(message: dict[str, Any]) -> str:
    content = message.get("content", "")
    if isinstance(content, list):  # multimodal content blocks: keep the text parts
        return " ".join(part.get("text", "") for part in content if part.get("type") == "text")
    return str(content)
