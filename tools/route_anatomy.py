"""Where do the tokens of the digit_sum task go? Routes by token kind, on and off the hint's path.

    PYTHONPATH=. python tools/route_anatomy.py --cache-dir /tmp/cache --output-dir /tmp/anatomy [--student PATH]

Samples responses of the (initial, or ``--student``) student to training prompts, runs the three passes
and the DOPD routing, and classifies every response token by kind (``label`` = which term comes next:
the plan; ``digit`` = the term's digit; ``value`` = the running total; ``answer``; ``format`` = ``>``,
spaces, ``#``, EOS) and by whether the response so far is still on the hint's path. For each class it
prints the token count, the route fractions, the mean teacher and self probabilities of the sampled
token, and the share of sampled tokens that are right (a label is right when it names an unused term,
a digit when it is that term's digit, a value when it is the true running total of the terms written).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections import defaultdict

import torch


def classify(prompt: str, hint_solution: str, text: str) -> list[tuple[str, bool, bool]]:
    """(kind, on the hint's path, right) for each character of a sampled response ``text`` (+ EOS)."""
    digits = {t[0]: int(t[1]) for t in prompt.split()[1:]}
    out, used, total, state, label = [], set(), None, "label", None
    for i, ch in enumerate(text + "\x00"):
        on_path = hint_solution.startswith(text[:i])
        if ch == "\x00":
            out.append(("format", on_path, True))
            break
        if state == "label" and ch == "#":
            state = "marker"
        if state == "label":
            right = ch in digits and ch not in used
            label = ch
            used.add(ch)
            out.append(("label", on_path, right))
            state = "digit"
        elif state == "digit":
            x = digits.get(label)
            out.append(("digit", on_path, ch.isdigit() and x is not None and int(ch) == x))
            total = (None if not ch.isdigit() else (int(ch) if total is None else (total + int(ch)) % 10))
            state = "gt"
        elif state == "gt":
            out.append(("format", on_path, ch == ">"))
            state = "value"
        elif state == "value":
            out.append(("value", on_path, ch.isdigit() and total is not None and int(ch) == total))
            state = "space"
        elif state == "space":
            out.append(("format", on_path, ch == " "))
            state = "label"
        elif state == "marker":
            if ch.isdigit():
                out.append(("answer", on_path, total is not None and int(ch) == total))
            else:
                out.append(("format", on_path, True))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", required=True)
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--student", help="a student checkpoint (default: the task's initial student)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--by-right", action="store_true", help="also split each class by right / wrong samples")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    from dopd.config import resolve_config
    from dopd.data import load_records
    from dopd.tasks.digit_sum import DigitProblem
    from dopd.tasks.registry import get_task
    from dopd.passes import build_pass_batch, output_projection, response_hidden
    from dopd.rollout import generate
    from dopd.trainer import Trainer
    from dopd_kernels import routed_loss

    hf_logging.disable_progress_bar()
    task = get_task("digit_sum")
    cfg = resolve_config(None, {"task": "digit_sum", "task_size": "small", "cache_dir": args.cache_dir,
                                "output_dir": args.output_dir, "progress": False})
    cfg, _ = task.prepare(cfg, log=lambda s: None, teacher_reference=False)
    trainer = Trainer(dataclasses.replace(cfg, eval_data=None), log=lambda s: None)
    trainer.setup()
    if args.student:
        from dopd.modeling import load_causal_lm

        trainer.student = load_causal_lm(args.student, "float32", torch.device("cpu"), trainable=False)
    records = load_records(os.path.join(args.output_dir, "data", "train.jsonl"))[: args.prompts]
    group = [r for r in records for _ in range(cfg.num_generations)]
    tok, tpl = trainer.tokenizer, trainer.template
    torch.manual_seed(args.seed)
    with torch.no_grad():  # the three passes of dopd.trainer.distill_loss, keeping the sampled ids
        roll = generate(trainer.student, tok, tpl.encode(tok, group, privileged=False),
                        max_new_tokens=cfg.max_new_tokens, do_sample=True, temperature=cfg.temperature)
        s_batch = build_pass_batch(tpl.encode(tok, group, privileged=False), roll.tokens, roll.mask, tok.pad_token_id)
        p_batch = build_pass_batch(tpl.encode(tok, group, privileged=True), roll.tokens, roll.mask, tok.pad_token_id)
        self_model = trainer.self_model if trainer.self_model is not None else trainer.student
        sw, sb = output_projection(trainer.student)
        tw, tb = output_projection(trainer.teacher)
        pw, pb = output_projection(self_model)
        out = routed_loss(response_hidden(trainer.student, s_batch), sw, response_hidden(trainer.teacher, p_batch), tw,
                          response_hidden(self_model, p_batch), roll.tokens, roll.mask, student_bias=sb,
                          teacher_bias=tb, self_weight=pw, self_bias=pb, config=trainer.loss_config)
    stats: dict = defaultdict(lambda: {"n": 0, "routes": [0, 0, 0, 0], "qT": 0.0, "qS": 0.0, "right": 0})
    eos = tok.eos_token_id
    for i, rec in enumerate(group):
        n_valid = int(roll.mask[i].sum())
        terms = rec.prompt.split()[1:]
        hint = rec.privileged.removeprefix("hint: ").split()
        plan = tuple(ord(s[0]) - ord("a") for s in hint)
        prob = DigitProblem("sum", tuple(int(t[1:]) for t in terms), plan)
        natural = plan == tuple(range(len(terms)))
        text = tok.decode([t for t in roll.tokens[i, :n_valid].tolist() if t != eos], skip_special_tokens=True)
        kinds = classify(rec.prompt, prob.solution(hinted=True), text)
        for j, (kind, on_path, right) in enumerate(kinds[:n_valid]):
            key = (kind, "natural hint" if natural else "other hint", "on path" if on_path else "off path")
            if args.by_right:
                key = key + ("right" if right else "wrong",)
            s = stats[key]
            s["n"] += 1
            s["routes"][int(out.route[i, j])] += 1
            s["qT"] += float(out.q_teacher[i, j])
            s["qS"] += float(out.q_self[i, j])
            s["right"] += right
    rows = []
    print(f"{'kind':8} {'hint':13} {'path':9} {'sample':6} {'n':>5}  {'LH':>5} {'LL':>5} {'HT':>5} {'HS':>5}  "
          f"{'q_T':>5} {'q_S':>5} {'right':>5}")
    for key in sorted(stats):
        s = stats[key]
        fr = [c / s["n"] for c in s["routes"]]
        row = dict(kind=key[0], hint=key[1], path=key[2], sample=key[3] if len(key) > 3 else "all", n=s["n"],
                   LH=fr[0], LL=fr[1], HT=fr[2], HS=fr[3], q_teacher=s["qT"] / s["n"], q_self=s["qS"] / s["n"],
                   right=s["right"] / s["n"])
        rows.append(row)
        print(f"{key[0]:8} {key[1]:13} {key[2]:9} {row['sample']:6} {s['n']:5d}  " + " ".join(f"{v:5.2f}" for v in fr)
              + f"  {row['q_teacher']:5.2f} {row['q_self']:5.2f} {row['right']:5.2f}")
    with open(os.path.join(args.output_dir, "anatomy.json"), "w") as fh:
        json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
