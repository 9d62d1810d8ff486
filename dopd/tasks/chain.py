"""The embedded task: a counted chain of ``+3 (mod 10)`` steps, with a step-wise hint.

A prompt gives a start digit and a number of steps k (2..6). The response counts the steps down and
applies ``x -> x + 3 mod 10`` at each one, then states the final answer::

    prompt      7, add 3 mod 10, 4 times
    privileged  hint: 4:7>0 3:0>3 2:3>6          (every step but the last: never the answer)
    response    4:7>0 3:0>3 2:3>6 1:6>9 #### 9

Every step is a one-input lookup (the previous result, the previous counter), which a tiny model
learns in a couple of minutes on a CPU; a model must get all k steps right to get the answer, so a
model that knows 7 of the 10 facts scores far below 70%. The hint really helps: with it, all but the
last step can be copied. The final answer is never in the hint (the paper found hints with the answer
worse than none). The problem space is small (10 starts x 5 lengths), so evaluation covers all of it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

ANSWER_MARKER = "####"
ADDEND, MODULUS = 3, 10
MIN_STEPS, MAX_STEPS = 2, 6


@dataclass(frozen=True)
class ChainProblem:
    """One problem: start digit and number of steps; prompt, hint, solution and answer derive from them."""

    start: int
    num_steps: int

    def steps(self) -> list[str]:
        """The steps ``"<counter>:<x>><x+3 mod 10>"``, counter from num_steps down to 1."""
        out, x = [], self.start
        for counter in range(self.num_steps, 0, -1):
            nxt = (x + ADDEND) % MODULUS
            out.append(f"{counter}:{x}>{nxt}")
            x = nxt
        return out

    @property
    def answer(self) -> str:
        """The final answer, one digit."""
        return str((self.start + ADDEND * self.num_steps) % MODULUS)

    @property
    def prompt(self) -> str:
        """What the student sees (at training and at test time)."""
        return f"{self.start}, add {ADDEND} mod {MODULUS}, {self.num_steps} times"

    @property
    def privileged(self) -> str:
        """The hint: every step except the last, so never the answer itself."""
        return "hint: " + " ".join(self.steps()[:-1])

    @property
    def solution(self) -> str:
        """The worked response a trained model produces."""
        return " ".join(self.steps()) + f" {ANSWER_MARKER} {self.answer}"

    def record(self) -> dict[str, str]:
        """The problem as a trainer record: prompt, privileged, answer."""
        return {"prompt": self.prompt, "privileged": self.privileged, "answer": self.answer}


def all_problems() -> list[ChainProblem]:
    """Every problem of the task (the evaluation set)."""
    return [ChainProblem(s, k) for k in range(MIN_STEPS, MAX_STEPS + 1) for s in range(MODULUS)]


def make_problems(n: int, seed: int) -> list[ChainProblem]:
    """``n`` problems drawn uniformly (with replacement) from a seeded RNG."""
    rng = random.Random(seed)
    return [ChainProblem(rng.randrange(MODULUS), rng.randint(MIN_STEPS, MAX_STEPS)) for _ in range(n)]


def make_records(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` trainer records (prompt, privileged, answer); see :func:`make_problems`."""
    return [p.record() for p in make_problems(n, seed)]
