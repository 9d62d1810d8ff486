"""Evaluation: greedy decoding on held-out prompts and an exact-match answer checker."""

from __future__ import annotations

import re
from typing import Any, Callable, Optional, Sequence

from dopd.data import PromptTemplate, Record
from dopd.rollout import generate

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def extract_answer(text: str, marker: str = "####") -> Optional[str]:
    """The final answer of a response: the text after the last ``marker``, else the last ``\\boxed{}``,
    else the last number; None when there is none."""
    if marker and marker in text:
        tail = text.rsplit(marker, 1)[1].strip()
        return tail.splitlines()[0].strip() if tail else None
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalize_answer(ans: str) -> str:
    """Compare answers modulo surrounding space, thousands commas and a trailing period."""
    return ans.strip().rstrip(".").replace(",", "").strip()


def exact_match(response: str, answer: str, marker: str = "####") -> bool:
    """True when the response's final answer equals ``answer`` after normalization."""
    got = extract_answer(response, marker)
    return got is not None and normalize_answer(got) == normalize_answer(answer)


def score(model: Any, tokenizer: Any, template: PromptTemplate, records: Sequence[Record], *,
          max_new_tokens: int, batch_size: int = 64, marker: str = "####",
          checker: Optional[Callable[[str, str], bool]] = None,
          generate_fn: Callable[..., Any] = generate) -> list[dict[str, Any]]:
    """Greedy-decode every record's student context (never the hint) and score it: one
    ``{"prompt", "response", "answer", "correct"}`` per record that has an answer, in order.

    ``generate_fn(model, tokenizer, contexts, max_new_tokens=..., do_sample=False)`` samples (default
    :func:`dopd.rollout.generate`; the trainer passes its wrapped student's).
    """
    scored = [r for r in records if r.answer is not None]
    if not scored:
        raise ValueError("evaluation records need an 'answer' field")
    check = checker or (lambda resp, ans: exact_match(resp, ans, marker))
    rows = []
    for i in range(0, len(scored), batch_size):
        chunk = scored[i: i + batch_size]
        contexts = template.encode(tokenizer, chunk, privileged=False)
        out = generate_fn(model, tokenizer, contexts, max_new_tokens=max_new_tokens, do_sample=False)
        texts = tokenizer.batch_decode(out.tokens, skip_special_tokens=True)
        rows += [{"prompt": rec.prompt, "response": text, "answer": rec.answer, "correct": bool(check(text, rec.answer))}
                 for rec, text in zip(chunk, texts)]
    return rows


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``{"accuracy", "n", "examples"}`` of :func:`score`'s rows; ``examples`` holds the first few for a human."""
    n = len(rows)
    return {"accuracy": sum(r["correct"] for r in rows) / max(n, 1), "n": n, "examples": list(rows[:5])}


def evaluate(model: Any, tokenizer: Any, template: PromptTemplate, records: Sequence[Record], *,
             max_new_tokens: int, batch_size: int = 64, marker: str = "####",
             checker: Optional[Callable[[str, str], bool]] = None) -> dict[str, Any]:
    """Greedy accuracy of ``model`` on ``records`` (:func:`score`, then :func:`summarize`).

    Returns ``{"accuracy", "n", "examples"}`` where ``examples`` holds the first few
    (prompt, response, answer, correct) for a human to look at.
    """
    return summarize(score(model, tokenizer, template, records, max_new_tokens=max_new_tokens,
                           batch_size=batch_size, marker=marker, checker=checker))
