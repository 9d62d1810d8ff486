"""The digit-sum task: add labelled digits mod 10 in any order, with a hint that is one worked order
(``--task digit_sum``, the embedded default of ``dopd train``).

A prompt lists n labelled digits (n = 3..5). The response takes the terms one at a time, in an order of
the solver's choosing, writing each term and the running total mod 10, then the answer::

    prompt      sum a4 b7 c2 d9
    privileged  hint: c2>2 a4>6 d9>5 b7            (a worked plan; the last step without its total)
    response    a4>4 b7>1 c2>3 d9>2 #### 2         (prompt order: the student's own plan)
    response    c2>2 a4>6 d9>5 b7>2 #### 2         (the hint's order: just as correct)

Every order is correct: the order is a free choice. A hint is a worked solution by a solver who picked
an order: half of the hints follow the prompt order, half a random other order. So a hint carries
both kinds of information the method separates:

- the terms' digits and the running totals: real skill (find the digit labelled b, add mod 10), which
  the student can learn to produce itself from the prompt;
- the order, when it is not the prompt's: a free choice that nothing in the prompt determines.

The teacher (wider, trained longer, on half hinted and half unhinted solutions) is hint-bound: with a
hint it always follows the hint's order, as it was always shown. The student (smaller, warmed up
briefly) reads hints too, but half of its hinted warm-up solutions keep the prompt order: it is not
bound by a hint. It also learned a second skill that distillation never trains, the running maximum
(``max a4 b7 c2``): the ``prior`` split measures what distillation makes it forget.

Where the tokens should go, and why (the privilege illusion). The student samples in prompt order.
- Format tokens (``>``, spaces, ``####``, EOS) and, on a hint in prompt order, most labels and totals:
  the teacher and the self agree and are sure: small gap, LH (teacher, top-K, 0.6).
- On a hint with another order, the first label where the student's order leaves the hint's: the
  teacher, sure of the hint's next term, gives the student's (equally correct) term a low probability;
  the self, not bound by the hint, a high one. A big gap with the self ahead: HS (self, 0.6). Vanilla
  OPD pulls the student toward the hint's term there, an order it cannot know at test time.
- After that point the teacher keeps looking for the hint's terms: it gives the right digit of the
  student's term a lower probability than the self does (HS again), while on totals it computes from
  the prefix and stays good (LH).
- The student's own mistakes (a wrong digit for a label, a wrong total): the teacher is sure they are
  wrong; where the self shares the mistake the gap is big and the self is ahead (HS: supervised by the
  self's distribution, which usually still favours the right token), where the self is unsure both
  are (LL, self, 0.3), and where the student was right but unsure the teacher is ahead (HT, JS, 1.0).
``tools/route_anatomy.py`` measures this (kinds x on/off the hint's path x right/wrong x routes). On
the initial student it found what was expected, with one difference in degree: format tokens 98-100%
LH; the diverging label 86% HS (teacher 0.14, self 0.64 on a token that is always right); right digits
after leaving another-order hint's path 60% HS (teacher 0.38, self 0.55); totals mostly LH; but the
student's wrong digits on the hint's own path go 95% to HS (teacher 0.02, self 0.16), hardly ever to
LL: HS takes the student's mistakes away from the teacher's correction (README, "Where DOPD helps").

Teacher and student (measured, held-out split): without the hint the teacher solves 1.000 and the
student 0.260. The teacher's imperfection is in the hinted predictions that distillation uses: with a
hint in another order it follows that order, and it gives right tokens of the student's path low
probability (above). (An unhinted teacher below 1.0 took a fragile, seed-dependent SFT budget on these
tiny models; the hint-bound teacher is the imperfection this task is about.)

Splits (fixed, never tuned to a result): a problem is identified by its operation and multiset of
digits; a quarter of the multisets (by a sha256 hash) is held out, and no ordering of them is ever used
to train the teacher, warm up the student or distil. ``heldout``: one ordering of each held-out sum
multiset of 3..5 digits (700 problems; ``full`` scores the first 600); ``ood``: 6 digits, longer than
anything trained on; ``prior``: held-out running-maximum problems (the student's earlier skill);
``dev`` (``--task-size small`` only): problems from the training part of the space that are not
distillation prompts, for choosing hyperparameters without looking at the held-out split.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import re
import string
from dataclasses import dataclass
from typing import Optional

from dopd.tasks.base import HELDOUT, BuiltinTask, TaskSize, split_bucket
from dopd.tasks.models import ModelSpec

MODULUS = 10
LENGTHS = range(3, 6)
OOD_LENGTHS = range(6, 7)
#: Share of hints that follow the prompt order (the natural plan); the rest use another order.
NATURAL_PLAN_SHARE = 0.5
#: Share of the student's warm-up problems that are running-maximum problems (its prior skill).
PRIOR_SHARE = 0.3
#: Share of the student's hinted warm-up solutions that follow the hint's order (the teacher's: all).
STUDENT_BOUND_SHARE = 0.5
OPS = ("sum", "max")
#: The labels of the digits in a prompt (so that a term is named, not counted: "b7" is the second).
LABELS = string.ascii_lowercase


@dataclass(frozen=True)
class DigitProblem:
    """``op`` ("sum" or "max") over ``digits``; ``plan`` is the order (indices into digits) of the hint."""

    op: str
    digits: tuple[int, ...]
    plan: tuple[int, ...]
    #: Whether this worked solution, when it shows the hint, follows the hint's order (a hint-bound
    #: solver) or keeps the prompt order (a solver that reads the hint but is not bound by it).
    follows_hint: bool = True

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {self.op!r}")
        if sorted(self.plan) != list(range(len(self.digits))):
            raise ValueError(f"plan must be a permutation of range({len(self.digits)}), got {self.plan}")

    def term(self, i: int) -> str:
        """The i-th digit with its label: ``"b7"``."""
        return f"{LABELS[i]}{self.digits[i]}"

    @property
    def prompt(self) -> str:
        """What the student sees: ``"sum a4 b7 c2 d9"``."""
        return f"{self.op} " + " ".join(self.term(i) for i in range(len(self.digits)))

    @property
    def answer(self) -> str:
        """The final answer, one digit."""
        return str(sum(self.digits) % MODULUS if self.op == "sum" else max(self.digits))

    def steps(self, order: Optional[tuple[int, ...]] = None) -> list[str]:
        """``"<label><digit>><running value>"`` for each term taken in ``order`` (default: prompt order)."""
        order = tuple(range(len(self.digits))) if order is None else order
        out, value = [], None
        for i in order:
            x = self.digits[i]
            if value is None:
                value = x
            else:
                value = (value + x) % MODULUS if self.op == "sum" else max(value, x)
            out.append(f"{self.term(i)}>{value}")
        return out

    @property
    def privileged(self) -> str:
        """The hint: the plan's worked steps, the last one without its value (so never the answer)."""
        steps = self.steps(self.plan)
        return "hint: " + " ".join(steps[:-1] + [steps[-1].split(">")[0]])

    def solution(self, hinted: bool = False) -> str:
        """The worked response: the hint's order when ``hinted`` (and ``follows_hint``), else the prompt order."""
        return " ".join(self.steps(self.plan if hinted and self.follows_hint else None)) + f" #### {self.answer}"

    @property
    def key(self) -> str:
        """What identifies the problem for the held-out split: the operation and the multiset."""
        return f"{self.op}:" + "".join(map(str, sorted(self.digits)))

    @property
    def heldout(self) -> bool:
        """True for the fixed quarter of multisets kept for evaluation."""
        return split_bucket(self.key, 4) == 0

    def record(self) -> dict[str, str]:
        """The problem as a trainer record: prompt, privileged, answer."""
        return {"prompt": self.prompt, "privileged": self.privileged, "answer": self.answer}


def random_plan(n: int, rng: random.Random, op: str = "sum") -> tuple[int, ...]:
    """The prompt order with probability NATURAL_PLAN_SHARE (always for "max"), else another order."""
    natural = tuple(range(n))
    if op == "max" or n < 2 or rng.random() < NATURAL_PLAN_SHARE:
        return natural
    while True:
        plan = tuple(rng.sample(range(n), n))
        if plan != natural:
            return plan


def make_problem(rng: random.Random, op: str = "sum", lengths: range = LENGTHS, heldout: bool = False) -> DigitProblem:
    """One random problem from the training part (``heldout=False``) or the held-out part of the space."""
    while True:
        n = rng.choice(list(lengths))
        digits = tuple(rng.randrange(MODULUS) for _ in range(n))
        probe = DigitProblem(op, digits, tuple(range(n)))
        if probe.heldout == heldout:
            return DigitProblem(op, digits, random_plan(n, rng, op))


def make_problems(n: int, seed: int, prior_share: float = 0.0, bound_share: float = 1.0) -> list[DigitProblem]:
    """``n`` training problems (never held out); a ``prior_share`` of them are running-maximum problems,
    and a ``bound_share`` of them have a worked solution that follows the hint's order."""
    rng, bound_rng = random.Random(seed), random.Random(seed + 7919)  # the problems do not depend on bound_share
    out = []
    for _ in range(n):
        p = make_problem(rng, "max" if rng.random() < prior_share else "sum")
        out.append(p if bound_rng.random() < bound_share else dataclasses.replace(p, follows_hint=False))
    return out


def heldout_problems(op: str, lengths: range, seed: int) -> list[DigitProblem]:
    """One ordering (seeded) of every held-out multiset with a length in ``lengths``, in a seeded order."""
    rng = random.Random(seed)
    out = []
    for n in lengths:
        for combo in itertools.combinations_with_replacement(range(MODULUS), n):
            if DigitProblem(op, combo, tuple(range(n))).heldout:
                digits = list(combo)
                rng.shuffle(digits)
                out.append(DigitProblem(op, tuple(digits), random_plan(n, rng, op)))
    rng.shuffle(out)
    return out


_STEP = re.compile(r"^([a-z])(\d)>(\d)$")


def parse_steps(response: str) -> Optional[list[tuple[str, int, int]]]:
    """``[(label, digit, running value), ...]`` of a response's work, or None when it is not well formed."""
    work = response.split("####", 1)[0].split()
    matches = [_STEP.match(step) for step in work]
    if not matches or not all(matches):
        return None
    return [(m.group(1), int(m.group(2)), int(m.group(3))) for m in matches]


def check_work(problem: DigitProblem, response: str) -> dict[str, bool]:
    """How a response's work holds up: ``uses_each_term_once`` (the terms, label and digit, are a
    permutation of the prompt's), ``values_right`` (every running value follows from the previous one
    and the term), ``answer_right`` (the final answer: what the accuracy counts)."""
    from dopd.evaluate import exact_match

    steps = parse_steps(response) or []
    terms = sorted(f"{label}{x}" for label, x, _ in steps)
    values_ok = bool(steps) and steps[0][2] == steps[0][1]
    for (_, _, prev), (_, x, value) in zip(steps, steps[1:]):
        expect = (prev + x) % MODULUS if problem.op == "sum" else max(prev, x)
        values_ok = values_ok and value == expect
    return {"uses_each_term_once": terms == sorted(problem.term(i) for i in range(len(problem.digits))),
            "values_right": values_ok, "answer_right": exact_match(response, problem.answer)}


class DigitSumTask(BuiltinTask):
    """Digit sums in any order with a one-plan hint (see the module docstring)."""

    name = "digit_sum"
    version = 2
    # The teacher: wider, trained longer, on half hinted (always following the hint's order) and half
    # unhinted solutions. The student: smaller, warmed up briefly (it knows part of the task) on sums
    # and running maxima, 60% of them hinted, half of those in its own order despite the hint.
    _teacher = ModelSpec(hidden_size=96, num_layers=2, num_heads=4, intermediate_size=192, sft_steps=800,
                         sft_batch=32, sft_lr=2e-3, hint_fraction=0.5, vocab_multiple=16, seed=1)
    _student = ModelSpec(hidden_size=48, num_layers=2, num_heads=4, intermediate_size=96, sft_steps=400,
                         sft_batch=32, hint_fraction=0.6, seed=2)
    sizes = {
        "full": TaskSize(teacher=_teacher, student=_student, train=4000,
                         evals={HELDOUT: 600, "ood": 200, "prior": 200, "dev": 0}),
        "small": TaskSize(teacher=_teacher, student=_student, train=4000,
                          evals={HELDOUT: 200, "ood": 100, "prior": 100, "dev": 300}),
        "tiny": TaskSize(
            teacher=ModelSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, sft_steps=8,
                              sft_batch=16, vocab_multiple=16, seed=1),
            student=ModelSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, sft_steps=4,
                              sft_batch=16, seed=2),
            train=64, evals={HELDOUT: 8, "ood": 4, "prior": 4, "dev": 0}),
    }

    defaults = dict(output_dir="dopd-default", learning_rate=1e-3, max_steps=100, self_model="frozen",
                    prompts_per_step=16, num_generations=4, max_new_tokens=36, temperature=1.0, warmup_ratio=0.05,
                    max_grad_norm=1.0, eval_batch_size=128, save_every=0, eval_every=20, answer_marker="####")

    def sampler(self, role: str):
        if role == "student":
            return lambda n, seed: make_problems(n, seed, prior_share=PRIOR_SHARE, bound_share=STUDENT_BOUND_SHARE)
        return make_problems  # the teacher: sums only, always bound to the hint's order

    def train_records(self, n: int, seed: int) -> list[dict[str, str]]:
        return [p.record() for p in make_problems(n, seed)]

    def eval_splits(self) -> dict[str, list[dict[str, str]]]:
        rng = random.Random(3)
        ood = [make_problem(rng, "sum", OOD_LENGTHS) for _ in range(500)]
        # dev: problems from the training part of the space that are not among the distillation
        # prompts, for choosing hyperparameters without looking at the held-out split.
        train_prompts = {r["prompt"] for r in self.train_records(self.sizes["full"].train, seed=1)}
        dev_rng, dev = random.Random(4), []
        while len(dev) < 300:
            p = make_problem(dev_rng, "sum")
            if p.prompt not in train_prompts and p.prompt not in {d.prompt for d in dev}:
                dev.append(p)
        return {HELDOUT: [p.record() for p in heldout_problems("sum", LENGTHS, seed=1)],
                "ood": [p.record() for p in ood],
                "prior": [p.record() for p in heldout_problems("max", LENGTHS, seed=2)],
                "dev": [p.record() for p in dev]}


TASK = DigitSumTask()
