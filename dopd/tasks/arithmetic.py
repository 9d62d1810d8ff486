"""The embedded task: chained single-digit addition modulo 10, with a step-wise hint.

A prompt asks for ``a1+a2+...+ak`` modulo 10. The expected response works left to right, one step
per partial sum, and ends with the final answer::

    prompt      sum mod 10: 3+5+8+2
    privileged  hint: 3+5=8 8+8=6          (every step but the last: the decomposition, not the answer)
    response    3+5=8 8+8=6 6+2=8 #### 8

The hint really helps: with it, all but the last step can be copied, so a model that reads the hint
makes far fewer errors -- the setting DOPD is about. The answer is the last step's result, which the
hint never contains, as the paper recommends (hints with the final answer did worse than none).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

ANSWER_MARKER = "####"


@dataclass(frozen=True)
class ChainProblem:
    """One problem: the operands, and the derived prompt, hint, worked solution and answer."""

    operands: tuple[int, ...]

    def steps(self) -> list[str]:
        """Return the steps ``"a+b=c"`` of the left-to-right modular sum."""
        out, acc = [], self.operands[0]
        for x in self.operands[1:]:
            nxt = (acc + x) % 10
            out.append(f"{acc}+{x}={nxt}")
            acc = nxt
        return out

    @property
    def answer(self) -> str:
        """The final answer, a single digit as a string."""
        return str(sum(self.operands) % 10)

    @property
    def prompt(self) -> str:
        """What the student sees (at training and at test time)."""
        return "sum mod 10: " + "+".join(str(x) for x in self.operands)

    @property
    def privileged(self) -> str:
        """The hint: every step except the last one, so never the answer itself."""
        return "hint: " + " ".join(self.steps()[:-1])

    @property
    def solution(self) -> str:
        """The worked response a trained model should produce."""
        return " ".join(self.steps()) + f" {ANSWER_MARKER} {self.answer}"

    def record(self) -> dict[str, str]:
        """The problem as a trainer record: prompt, privileged, answer."""
        return {"prompt": self.prompt, "privileged": self.privileged, "answer": self.answer}


def make_problems(n: int, seed: int, min_operands: int = 3, max_operands: int = 5) -> list[ChainProblem]:
    """Draw ``n`` random problems with ``min_operands..max_operands`` operands from a seeded RNG."""
    if not 2 <= min_operands <= max_operands:
        raise ValueError("need 2 <= min_operands <= max_operands")
    rng = random.Random(seed)
    return [
        ChainProblem(tuple(rng.randrange(10) for _ in range(rng.randint(min_operands, max_operands))))
        for _ in range(n)
    ]


def make_records(n: int, seed: int, **kwargs: int) -> list[dict[str, str]]:
    """``n`` trainer records (prompt, privileged, answer) of the task; see :func:`make_problems`."""
    return [p.record() for p in make_problems(n, seed, **kwargs)]
