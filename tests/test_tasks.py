"""The built-in tasks: registry, generators, answer checkers, and held-out splits never used in training."""

import json
import subprocess
import sys

import pytest

from dopd.tasks import chain, digit_sum
from dopd.tasks.digit_sum import DigitProblem, check_work, parse_steps
from dopd.tasks.registry import DEFAULT_TASK, get_task, task_defaults, task_names


def _digit_problem(record: dict) -> DigitProblem:
    op, *terms = record["prompt"].split()
    return DigitProblem(op, tuple(int(t[1:]) for t in terms), tuple(range(len(terms))))


# ------------------------------------------------------------------------------------------ registry
def test_registry_names_and_defaults():
    assert set(task_names()) == {"digit_sum", "chain"} and DEFAULT_TASK in task_names()
    assert get_task(None) is get_task(DEFAULT_TASK)
    for name in task_names():
        task = get_task(name)
        assert task.name == name and set(task.sizes) == {"full", "small", "tiny"}
        assert task_defaults(name)["max_steps"] > task_defaults(name, "tiny")["max_steps"]
    with pytest.raises(KeyError, match="unknown task"):
        get_task("nope")


def test_tasks_do_not_import_the_config_or_trainer():
    """The old circle config -> tasks.default -> config, trainer is gone: tasks load on their own."""
    code = ("import sys, dopd.tasks.registry as r; [r.get_task(n) for n in r.task_names()]; "
            "print(sorted(m for m in ('dopd.config', 'dopd.trainer') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_task_flag_and_errors():
    from dopd.config import ConfigError, resolve_config

    assert resolve_config(None, {"task": "chain"}).output_dir == "dopd-chain"
    assert resolve_config(None, {}).output_dir == "dopd-default"
    with pytest.raises(ConfigError, match="unknown task"):
        resolve_config(None, {"task": "nope"}).validate()
    with pytest.raises(ConfigError, match="task_size"):
        resolve_config(None, {"task_size": "huge"})
    with pytest.raises(ConfigError, match="built-in task"):
        resolve_config(None, {"task": "chain", "student": "s", "teacher": "t", "data": "d"})


# ------------------------------------------------------------------------------------------ digit_sum
def test_digit_sum_generator_solutions_and_hints():
    problems = digit_sum.make_problems(400, seed=5)
    natural = 0
    for p in problems:
        n = len(p.digits)
        assert 3 <= n <= 5 and p.op == "sum"
        assert p.answer == str(sum(p.digits) % 10)
        for hinted in (False, True):
            assert check_work(p, p.solution(hinted)) == {"uses_each_term_once": True, "values_right": True,
                                                         "answer_right": True}
        # The hint is the plan's steps, the last one without its value: never the answer.
        hint_steps = p.privileged.removeprefix("hint: ").split()
        assert len(hint_steps) == n and ">" not in hint_steps[-1]
        assert p.solution(True).startswith(" ".join(hint_steps))
        assert p.solution(False).split()[0].startswith(p.term(0) + ">")  # the student's own plan: prompt order
        natural += p.plan == tuple(range(n))
    # Half of the hints follow the prompt order, half another order (a free choice).
    assert 0.4 < natural / len(problems) < 0.6
    assert DigitProblem("sum", (4, 7, 2, 9), (2, 0, 3, 1)).prompt == "sum a4 b7 c2 d9"
    assert DigitProblem("sum", (4, 7, 2, 9), (2, 0, 3, 1)).privileged == "hint: c2>2 a4>6 d9>5 b7"
    assert DigitProblem("max", (4, 7, 2), (0, 1, 2)).solution() == "a4>4 b7>7 c2>7 #### 7"
    with pytest.raises(ValueError, match="permutation"):
        DigitProblem("sum", (1, 2), (0, 0))


def test_digit_sum_answer_checker():
    p = DigitProblem("sum", (4, 7, 2, 9), (0, 1, 2, 3))
    task = get_task("digit_sum")
    good = "a4>4 b7>1 c2>3 d9>2 #### 2"
    other_order = "c2>2 a4>6 d9>5 b7>2 #### 2"
    assert task.check_answer(good, "2") and task.check_answer(other_order, "2")
    assert check_work(p, other_order)["uses_each_term_once"]
    assert check_work(p, "a4>4 a4>8 c2>0 d9>9 #### 9") == {"uses_each_term_once": False, "values_right": True,
                                                           "answer_right": False}
    assert check_work(p, "a4>4 b7>1 c2>4 d9>3 #### 2") == {"uses_each_term_once": True, "values_right": False,
                                                           "answer_right": True}  # a lucky answer still counts
    assert not task.check_answer("a4>4 b7>1 #### 3", "2") and not task.check_answer("a4>4 b7>1 ####", "2")
    assert task.check_answer("a4>4 b7>1 c2>3 d9>2 ####  2 ", "2")  # the trainer's checker: spaces do not matter
    assert parse_steps("junk #### 2") is None and parse_steps("a4>4 b7>1 #### 1") == [("a", 4, 4), ("b", 7, 1)]
    assert check_work(p, "") == {"uses_each_term_once": False, "values_right": False, "answer_right": False}


def test_digit_sum_heldout_split_is_never_trained_on():
    task = get_task("digit_sum")
    splits = task.eval_splits()
    heldout = splits["heldout"]
    assert len(heldout) >= 500 and len({r["prompt"] for r in heldout}) == len(heldout)
    held_keys = {_digit_problem(r).key for r in heldout}
    assert all(_digit_problem(r).heldout for r in heldout)
    # Every source of training problems: distillation records, the teacher's and the student's SFT.
    seen = [_digit_problem(r) for r in task.train_records(task.sizes["full"].train, seed=1)]  # = data/train.jsonl
    for role in ("teacher", "student"):
        for seed in range(5):
            seen += list(task.sampler(role)(200, seed))
    assert not any(p.heldout for p in seen)
    assert not held_keys & {p.key for p in seen}
    assert {p.op for p in seen} == {"sum", "max"}  # the student's warm-up also has its prior skill
    # The extra splits: longer lists (ood) and the prior skill (held-out max problems).
    assert all(len(r["prompt"].split()) - 1 == 6 for r in splits["ood"])
    assert all(r["prompt"].startswith("max ") and _digit_problem(r).heldout for r in splits["prior"])
    # dev: from the training part of the space, but never a distillation prompt (for choosing settings).
    assert not any(_digit_problem(r).heldout for r in splits["dev"])
    assert not {r["prompt"] for r in splits["dev"]} & {r["prompt"] for r in task.train_records(4000, seed=1)}
    assert task.eval_splits() == splits  # fixed: the same every time


# ------------------------------------------------------------------------------------------ chain
def test_chain_problems_and_split():
    p = chain.ChainProblem(7, 4, addend=4)
    assert p.prompt == "7, add 4 mod 10, 4 times" and p.answer == "3"
    assert p.privileged == "hint: 4:7>1 3:1>5 2:5>9" and p.solution() == "4:7>1 3:1>5 2:5>9 1:9>3 #### 3"
    task = get_task("chain")
    splits = task.eval_splits()
    assert len(chain.all_problems()) == 450 and len(splits["heldout"]) > 100
    train = {r["prompt"] for r in task.train_records(2000, seed=1)}
    sft = {p.prompt for s in range(3) for p in task.sampler("teacher")(100, s)}
    assert not ({r["prompt"] for r in splits["heldout"]} & (train | sft))
    assert all(int(r["prompt"].split(", ")[-1].split()[0]) > 6 for r in splits["ood"])


@pytest.mark.parametrize("name", ["digit_sum", "chain"])
def test_run_directory_keeps_the_data_it_used(tmp_path, name):
    task = get_task(name)
    paths = task.write_data(str(tmp_path), "small")
    assert paths["train"] == str(tmp_path / "data" / "train.jsonl")
    assert paths["heldout"] == str(tmp_path / "data" / "eval.jsonl")
    train = [json.loads(line) for line in open(paths["train"])]
    evals = [json.loads(line) for line in open(paths["heldout"])]
    assert len(train) == task.sizes["small"].train and len(evals) == task.sizes["small"].evals["heldout"]
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    assert all(r["answer"] for r in evals)
