"""The ``dopd`` command: ``dopd train``, ``dopd eval``, ``dopd plot``, ``dopd compare``.

``dopd train`` with no student/teacher/data runs a built-in task (``--task NAME``, see
``dopd.tasks.registry``; default ``digit_sum``). ``dopd compare`` lives in ``dopd.compare``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import warnings
from typing import Optional, Sequence

from dopd.config import ConfigError, add_config_flags, flag_overrides, resolve_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dopd", description="Dual On-policy Distillation: train, evaluate, plot.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)
    # No ArgumentDefaultsHelpFormatter: every config flag defaults to None (it overrides nothing unless
    # given) and already states the field's real default in its help.
    tr = sub.add_parser(
        "train", help="distil a student (no arguments: the embedded default task)", parents=[common],
        epilog="Without --student/--teacher/--data a built-in task runs (--task), with defaults of its own for "
               "some flags (README: 'Built-in tasks'). Several processes: torchrun --nproc_per_node N -m dopd train "
               "... (README: 'Several GPUs').")
    tr.add_argument("--config", help="YAML file of TrainConfig fields (flags override it)")
    add_config_flags(tr)
    ev = sub.add_parser("eval", help="greedy accuracy of a model on held-out prompts", parents=[common])
    ev.add_argument("--model", required=True, help="path or id of the model to evaluate")
    ev.add_argument("--data", required=True, help="JSON lines with prompt and answer")
    ev.add_argument("--tokenizer", help="tokenizer path or Hub id (default: the model's)")
    ev.add_argument("--max-new-tokens", type=int, default=256, help="longest response, in tokens (default: 256)")
    ev.add_argument("--batch-size", type=int, default=64, help="prompts per generate call (default: 64)")
    ev.add_argument("--limit", type=int, default=0, help="evaluate only the first N records (default: 0: all)")
    ev.add_argument("--answer-marker", default="####",
                    help="the final answer follows the last marker (default: '####')")
    ev.add_argument("--student-template", default="{prompt}",
                    help="the model's context; {prompt} is replaced (default: '{prompt}')")
    ev.add_argument("--response-prefix", default="\n",
                    help="appended to contexts when the tokenizer has no chat template (default: '\\n')")
    ev.add_argument("--no-chat-template", action="store_true",
                    help="do not render contexts through the tokenizer's chat template")
    ev.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: 'auto')")
    ev.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="the model's weights and compute dtype; bfloat16 halves the memory (default: 'float32')")
    ev.add_argument("--output", help="write the result as JSON here (default: none)")
    pl = sub.add_parser("plot", help="draw route fractions, loss and accuracy of a run into a PNG", parents=[common])
    pl.add_argument("dir", help="the run's output directory (holds metrics.jsonl)")
    pl.add_argument("--out", help="PNG path (default: DIR/training.png)")
    from dopd.compare import add_compare_parser

    add_compare_parser(sub, parents=[common])
    return p


def _train(args: argparse.Namespace) -> int:
    import dataclasses

    from dopd.distributed import init_distributed, rank_device, shutdown
    from dopd.preflight import check_flags
    from dopd.trainer import check_world

    config = resolve_config(args.config, flag_overrides(args))
    # Under torchrun: join the other ranks (NCCL on cuda:LOCAL_RANK, gloo on CPU); else a single process.
    ctx = init_distributed(config.device, config.dist_timeout)
    check_world(config, ctx)
    # The flags alone, before the embedded task trains its teacher (minutes).
    check_flags(dataclasses.replace(config, device=rank_device(config.device, ctx.local_rank if ctx.enabled else None)),
                warn=False)
    embedded = config.is_embedded_default
    if embedded:
        import os

        import torch

        from dopd.tasks.registry import get_task

        if "OMP_NUM_THREADS" not in os.environ:
            # The tiny models' matrices are too small to split across threads: synchronisation
            # costs more than it saves (10x slower on a busy 2-core machine), so use one thread.
            torch.set_num_threads(1)
        # Rank 0 trains (or loads from the cache) the tiny models and writes the data; the other ranks take
        # its paths (several nodes: --cache-dir and --output-dir on a filesystem they share).
        prepared = get_task(config.task).prepare(config) if ctx.is_main else None
        config, reference = ctx.broadcast_object(prepared)
    from dopd.trainer import Trainer

    summary = Trainer(config, dist=ctx).train()
    if ctx.is_main:
        before, after = summary.get("accuracy_before"), summary.get("accuracy_after")
        print(f"checkpoint: {summary['checkpoint']}")
        if after is not None:
            first = f"{before:.3f} -> " if before is not None else ""
            print(f"student accuracy ({config.preset}): {first}{after:.3f}")
        if embedded:
            print(f"teacher accuracy without the hint: {reference['teacher_accuracy']:.3f} "
                  f"(held-out split, for reference; the student never sees the hint)")
    shutdown(ctx)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from dopd.data import PromptTemplate
    from dopd.evaluate import evaluate
    from dopd.modeling import CompatibilityError, first_line, load_causal_lm, load_tokenizer, model_config, resolve_device
    from dopd.precision import Precision
    from dopd.preflight import load_data

    # Everything that needs no weights first: the data and its answers, the device, the model's config.
    if args.limit < 0 or args.batch_size < 1 or args.max_new_tokens < 1:
        raise ConfigError(f"--limit must be >= 0, --batch-size and --max-new-tokens >= 1; got {args.limit}, "
                          f"{args.batch_size}, {args.max_new_tokens}")
    records = load_data("--data", args.data, eval_data=True)[: args.limit or None]
    device = resolve_device(args.device)
    precision = Precision(args.dtype)
    model_config(args.model, "--model")
    template = PromptTemplate(student_template=args.student_template, response_prefix=args.response_prefix,
                              use_chat_template=not args.no_chat_template)
    try:
        tokenizer = load_tokenizer(args.tokenizer or args.model)
    except OSError as err:
        raise CompatibilityError(f"{'--tokenizer' if args.tokenizer else '--model'} {args.tokenizer or args.model}: "
                                 f"cannot load its tokenizer ({first_line(err)})") from None
    model = load_causal_lm(args.model, precision.frozen_dtype, device, trainable=False)
    with precision.autocast(device):
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
    """Entry point of the ``dopd`` console script; returns the exit status.

    A bad flag, file or model is one line ``dopd <command>: error: ...`` and status 2 (``--debug``: the
    traceback instead).
    """
    args = _parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file load/save bars would bury the training progress bar
    from dopd.data import DataError
    from dopd.modeling import CompatibilityError

    from dopd.distributed import DistContext, failure_message, is_collective_failure

    try:
        with warnings.catch_warnings():  # one line per warning, like the errors (restored on return)
            # Under torchrun every rank would print the same warnings: rank 0 speaks for all (as for the logs).
            quiet_rank = os.environ.get("RANK", "0") != "0"
            warnings.showwarning = lambda message, category, *_a, **_k: None if quiet_rank else print(
                f"dopd {args.command}: warning: {message}", file=sys.stderr)
            if args.command == "compare":
                from dopd.compare import run_compare_command

                return run_compare_command(args)
            return {"train": _train, "eval": _eval, "plot": _plot}[args.command](args)
    except (ConfigError, DataError, CompatibilityError, OSError) as err:  # OSError: a missing model path
        if args.debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__  # one line, whatever the library wrote
        ctx = DistContext.current()
        where = f"{ctx.describe()}: " if ctx.enabled else ""
        print(f"dopd {args.command}: error: {where}{message}", file=sys.stderr)
        return 2
    except (Exception, _checkpoint_exception()) as err:  # torch.distributed.checkpoint's is a BaseException
        ctx = DistContext.current()
        if args.debug or not ctx.enabled:
            raise  # a single process: the traceback, as ever
        # One of several ranks: say which one and why, on one line. The launcher (torchrun) then stops the
        # others; a rank waiting in a collective for this one fails at once (gloo) or after --dist-timeout.
        if not (isinstance(err, FloatingPointError) or is_collective_failure(err)):
            traceback.print_exc()  # unexpected: keep the traceback above the summary line
        print(f"dopd {args.command}: error: {failure_message(err, ctx)}", file=sys.stderr, flush=True)
        return 1


def _checkpoint_exception() -> type:
    """torch.distributed.checkpoint's CheckpointException (a BaseException, so ``except Exception`` misses it)."""
    try:
        from torch.distributed.checkpoint.api import CheckpointException
    except ImportError:  # torch built without distributed
        return Exception
    return CheckpointException


if __name__ == "__main__":
    sys.exit(main())
