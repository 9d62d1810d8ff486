"""Watch the privileged self step by step: why a live self-distillation target collapses.

    PYTHONPATH=. python tools/self_drift.py --preset dopd --self-model live --steps 60 --every 10 \
        --cache-dir /tmp/cache --output-dir /tmp/drift-live

Runs the ordinary trainer on a built-in task one step at a time. Every ``--every`` steps it records the
student's held-out accuracy without the hint, the self model's and the student's accuracy WITH the
hint (what the self routes distil from; the same model for a live self), how much the hint still changes the model's prediction of its own samples (mean
|log p(y | x) - log p_self(y | x, hint)| over the sampled tokens: near 0 means the self ignores the
hint), the route fractions and per-route losses of that step, and one greedy response. Writes
``drift.jsonl`` and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default=None)
    ap.add_argument("--task-size", default="small")
    ap.add_argument("--preset", default="dopd")
    ap.add_argument("--self-model", default="live")
    ap.add_argument("--self-ema-decay", type=float, default=0.95)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--eval-n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    ap.add_argument("--cache-dir", required=True)
    ap.add_argument("--output-dir", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import yaml
    from transformers.utils import logging as hf_logging

    from dopd.config import resolve_config
    from dopd.data import load_records
    from dopd.tasks.base import accuracy
    from dopd.tasks.registry import get_task
    from dopd.trainer import Trainer, distill_loss

    hf_logging.disable_progress_bar()
    flags = dict(task=args.task, task_size=args.task_size, preset=args.preset, self_model=args.self_model,
                 self_ema_decay=args.self_ema_decay, max_steps=args.steps, cache_dir=args.cache_dir,
                 output_dir=args.output_dir, seed=args.seed, progress=False, eval_every=0)
    flags.update({k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)})
    task = get_task(args.task)
    cfg, _ = task.prepare(resolve_config(None, {k: v for k, v in flags.items() if v is not None}),
                          log=lambda s: None, teacher_reference=False)
    cfg = dataclasses.replace(cfg, eval_data=None)
    heldout = load_records(os.path.join(args.output_dir, "data", "eval.jsonl"))[: args.eval_n]
    probe = [dataclasses.asdict(r) for r in heldout]
    trainer = Trainer(cfg, log=lambda s: None)
    trainer.setup()
    out_path = os.path.join(args.output_dir, "drift.jsonl")
    rows = []
    row: dict = {}
    for step in range(args.steps + 1):
        if step % args.every == 0:
            self_model = trainer.self_model if trainer.self_model is not None else trainer.student
            with torch.no_grad():
                torch.manual_seed(1234)  # the same probe rollouts at every checkpoint of the table
                out, _ = distill_loss(trainer.student, trainer.teacher, trainer.tokenizer, trainer.template,
                                      heldout[:16], cfg, trainer.loss_config, trainer.self_model)
                valid = out.route >= 0
                hint_effect = (out.student_logprob - out.q_self.clamp_min(1e-30).log())[valid].abs().mean().item()
            rec = {"step": step,
                   "student_acc": accuracy(trainer.student, cfg, task, probe),
                   "self_hinted_acc": accuracy(self_model, cfg, task, probe, hinted=True),
                   "student_hinted_acc": accuracy(trainer.student, cfg, task, probe, hinted=True),
                   "hint_effect": hint_effect,
                   **{k: row.get(k) for k in ("loss", "frac/LH", "frac/LL", "frac/HT", "frac/HS", "loss/LH",
                                              "loss/LL", "loss/HT", "loss/HS", "q_self_mean", "q_teacher_mean")}}
            from dopd.evaluate import evaluate

            rec["example"] = evaluate(trainer.student, trainer.tokenizer, trainer.template, heldout[:1],
                                      max_new_tokens=cfg.max_new_tokens)["examples"][0]["response"]
            rows.append(rec)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rec.items()}), flush=True)
        if step < args.steps:
            row = trainer.train_step()
    with open(out_path, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
