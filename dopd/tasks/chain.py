"""The chain task: a counted chain of ``+a (mod 10)`` steps, with a step-wise hint (``--task chain``).

A prompt gives a start digit, an addend a (1..9) and a number of steps k. The response counts the steps
down and applies ``x -> x + a mod 10`` at each one, then states the final answer::

    prompt      7, add 4 mod 10, 4 times
    privileged  hint: 4:7>1 3:1>5 2:5>9          (every step but the last: never the answer)
    response    4:7>1 3:1>5 2:5>9 1:9>3 #### 3

Every step is a lookup in the 10 x 9 addition table; a model must get all k steps right to get the
answer. The hint really helps (all but the last step can be copied), and every hint step is something
the student can learn to produce itself: there is no free choice in a response, so on this task the
teacher's confidence with the hint is real skill, and DOPD's routing has little to separate (see
``dopd.tasks.digit_sum`` for a task where it has).

Problems: start 0..9 x addend 1..9 x k in 2..6 (450); a fixed quarter of them (by a hash of the
problem) is the held-out split, never used to train the teacher, warm up the student or distil.
``ood``: k in 7..8, longer than any trained chain.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from dopd.tasks.base import HELDOUT, BuiltinTask, TaskSize, split_bucket
from dopd.tasks.models import ModelSpec

MODULUS = 10
ADDENDS = range(1, 10)
STEPS = range(2, 7)
OOD_STEPS = range(7, 9)


@dataclass(frozen=True)
class ChainProblem:
    """One problem: start digit, addend and number of steps; prompt, hint, solution and answer derive from them."""

    start: int
    num_steps: int
    addend: int = 3

    def steps(self) -> list[str]:
        """The steps ``"<counter>:<x>><x+a mod 10>"``, counter from num_steps down to 1."""
        out, x = [], self.start
        for counter in range(self.num_steps, 0, -1):
            nxt = (x + self.addend) % MODULUS
            out.append(f"{counter}:{x}>{nxt}")
            x = nxt
        return out

    @property
    def answer(self) -> str:
        """The final answer, one digit."""
        return str((self.start + self.addend * self.num_steps) % MODULUS)

    @property
    def prompt(self) -> str:
        """What the student sees (at training and at test time)."""
        return f"{self.start}, add {self.addend} mod {MODULUS}, {self.num_steps} times"

    @property
    def privileged(self) -> str:
        """The hint: every step except the last, so never the answer itself."""
        return "hint: " + " ".join(self.steps()[:-1])

    def solution(self, hinted: bool = False) -> str:
        """The worked response (the same with or without the hint: a chain has no free choice)."""
        return " ".join(self.steps()) + f" #### {self.answer}"

    @property
    def key(self) -> str:
        """What identifies the problem for the held-out split."""
        return f"chain:{self.start}:{self.addend}:{self.num_steps}"

    @property
    def heldout(self) -> bool:
        """True for the fixed quarter of the problem space kept for evaluation."""
        return split_bucket(self.key, 4) == 0

    def record(self) -> dict[str, str]:
        """The problem as a trainer record: prompt, privileged, answer."""
        return {"prompt": self.prompt, "privileged": self.privileged, "answer": self.answer}


def all_problems(steps: range = STEPS) -> list[ChainProblem]:
    """Every problem with a step count in ``steps``, in a fixed order."""
    return [ChainProblem(s, k, a) for k in steps for a in ADDENDS for s in range(MODULUS)]


def make_problems(n: int, seed: int) -> list[ChainProblem]:
    """``n`` training problems drawn uniformly (with replacement) from the non-held-out ones."""
    rng = random.Random(seed)
    pool = [p for p in all_problems() if not p.heldout]
    return [rng.choice(pool) for _ in range(n)]


def make_records(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` trainer records (prompt, privileged, answer); see :func:`make_problems`."""
    return [p.record() for p in make_problems(n, seed)]


class ChainTask(BuiltinTask):
    """The counted ``+a mod 10`` chain (see the module docstring)."""

    name = "chain"
    version = 2  # v1: addend fixed at 3, 50 problems, no held-out split
    _teacher = ModelSpec(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, sft_steps=800,
                         sft_batch=32, vocab_multiple=16, seed=1)
    # Warm-started on hinted prompts only: it learns to use a hint (its privileged self is strong, as
    # an LLM's is in the paper) but has not learned to solve without one.
    _student = ModelSpec(hidden_size=48, num_layers=2, num_heads=4, intermediate_size=96, sft_steps=250,
                         sft_batch=32, hint_fraction=1.0, seed=2)
    sizes = {
        "full": TaskSize(teacher=_teacher, student=_student, train=2000, evals={HELDOUT: 1000, "ood": 100}),
        "small": TaskSize(teacher=_teacher, student=_student, train=2000, evals={HELDOUT: 64, "ood": 32}),
        "tiny": TaskSize(
            teacher=ModelSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, sft_steps=8,
                              sft_batch=16, vocab_multiple=16, seed=1),
            student=ModelSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, sft_steps=4,
                              sft_batch=16, seed=2),
            train=64, evals={HELDOUT: 8, "ood": 4}),
    }

    # self_model="frozen": the privileged self is the initial student (which reads hints well).
    # With the live student as its own privileged self these tiny models collapse the self routes
    # (README, "The privileged self").
    defaults = dict(output_dir="dopd-chain", learning_rate=2e-3, max_steps=100, self_model="frozen",
                    prompts_per_step=16, num_generations=4, max_new_tokens=60, temperature=1.0, warmup_ratio=0.05,
                    max_grad_norm=1.0, eval_batch_size=64, save_every=0, eval_every=30, answer_marker="####")

    def sampler(self, role: str):
        return make_problems

    def train_records(self, n: int, seed: int) -> list[dict[str, str]]:
        return make_records(n, seed)

    def eval_splits(self) -> dict[str, list[dict[str, str]]]:
        heldout = [p for p in all_problems() if p.heldout]
        random.Random(0).shuffle(heldout)  # a fixed order, so a size's prefix mixes all lengths
        ood = all_problems(OOD_STEPS)
        random.Random(0).shuffle(ood)
        return {HELDOUT: [p.record() for p in heldout], "ood": [p.record() for p in ood]}


TASK = ChainTask()
