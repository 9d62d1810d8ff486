"""The ``dopd`` command: ``dopd train``, ``dopd eval``, ``dopd plot``, ``dopd compare``.

``dopd train`` with no student/teacher/data runs a built-in task (``--task NAME``, see
``dopd.tasks.registry``; default ``digit_sum``). ``dopd compare`` lives in ``dopd.compare``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from dopd.config import ConfigError, add_config_flags, flag_overrides, resolve_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dopd", description="Dual On-policy Distillation: train, evaluate, plot.")
    sub = p.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="distil a student (no arguments: the embedded default task)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    tr.add_argument("--config", help="YAML file of TrainConfig fields (flags override it)")
    add_config_flags(tr)
    ev = sub.add_parser("eval", help="greedy accuracy of a model on held-out prompts")
    ev.add_argument("--model", required=True, help="path or id of the model to evaluate")
    ev.add_argument("--data", required=True, help="JSON lines with prompt and answer")
    ev.add_argument("--tokenizer", help="defaults to the model's")
    ev.add_argument("--max-new-tokens", type=int, default=256)
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--limit", type=int, default=0, help="evaluate only the first N records (0: all)")
    ev.add_argument("--answer-marker", default="####", help="the final answer follows the last marker")
    ev.add_argument("--student-template", default="{prompt}")
    ev.add_argument("--response-prefix", default="\n")
    ev.add_argument("--no-chat-template", action="store_true")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--output", help="write the result as JSON here")
    pl = sub.add_parser("plot", help="draw route fractions, loss and accuracy of a run into a PNG")
    pl.add_argument("dir", help="the run's output directory (holds metrics.jsonl)")
    pl.add_argument("--out", help="PNG path (default DIR/training.png)")
    from dopd.compare import add_compare_parser

    add_compare_parser(sub)
    return p


def _train(args: argparse.Namespace) -> int:
    config = resolve_config(args.config, flag_overrides(args))
    embedded = config.is_embedded_default
    if embedded:
        import os

        import torch

        from dopd.tasks.registry import get_task

        if "OMP_NUM_THREADS" not in os.environ:
            # The tiny models' matrices are too small to split across threads: synchronisation
            # costs more than it saves (10x slower on a busy 2-core machine), so use one thread.
            torch.set_num_threads(1)
        config, reference = get_task(config.task).prepare(config)
    from dopd.trainer import Trainer

    summary = Trainer(config).train()
    before, after = summary.get("accuracy_before"), summary.get("accuracy_after")
    print(f"checkpoint: {summary['checkpoint']}")
    if after is not None:
        first = f"{before:.3f} -> " if before is not None else ""
        print(f"student accuracy ({config.preset}): {first}{after:.3f}")
    if embedded:
        print(f"teacher accuracy without the hint: {reference['teacher_accuracy']:.3f} "
              f"(held-out split, for reference; the student never sees the hint)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from dopd.data import PromptTemplate, load_records
    from dopd.evaluate import evaluate
    from dopd.modeling import load_causal_lm, load_tokenizer, resolve_device

    records = load_records(args.data, require_privileged=False)[: args.limit or None]
    template = PromptTemplate(student_template=args.student_template, response_prefix=args.response_prefix,
                              use_chat_template=not args.no_chat_template)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    model = load_causal_lm(args.model, "float32", resolve_device(args.device), trainable=False)
    result = evaluate(model, tokenizer, template, records, max_new_tokens=args.max_new_tokens,
                      batch_size=args.batch_size, marker=args.answer_marker)
    print(f"accuracy: {result['accuracy']:.4f} ({result['n']} prompts)")
    for ex in result["examples"][:3]:
        print(f"  {'ok ' if ex['correct'] else 'err'} {ex['prompt']!r} -> {ex['response']!r} (answer {ex['answer']})")
    if args.output:
        with open(args.output, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


def _plot(args: argparse.Namespace) -> int:
    from dopd.plot import plot_run

    print(plot_run(args.dir, args.out))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``dopd`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file load/save bars would bury the training progress bar
    from dopd.data import DataError
    from dopd.modeling import CompatibilityError

    try:
        if args.command == "compare":
            from dopd.compare import run_compare_command

            return run_compare_command(args)
        return {"train": _train, "eval": _eval, "plot": _plot}[args.command](args)
    except (ConfigError, DataError, CompatibilityError, OSError) as err:  # OSError: a missing model path
        print(f"dopd {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
