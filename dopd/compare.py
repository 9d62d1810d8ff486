"""``dopd compare``: several presets x seeds through the ordinary trainer, everything else equal.

    dopd compare --task digit_sum --presets dopd,vanilla_opd,opsd,sdpo,gkd --seeds 3 --output-dir DIR
    dopd compare --presets dopd --ablations --seeds 3 --output-dir DIR        # DOPD without LH/LL/HT/HS
    dopd compare --presets dopd@live,dopd@frozen,dopd@ema --seeds 3 --output-dir DIR

Every run gets the same task, data files, teacher, initial student, steps and TrainConfig; only the
preset (or the route table, or the privileged self) and the seed differ. The seed moves the rollouts'
sampling and the data order; the models are the task's cached ones, the same for every seed. The parent
prepares the task once (``DIR/data/``), scores the initial student on every split, then runs the jobs
in worker processes (``--jobs``; one thread each) and writes:

- ``DIR/compare.json``: one entry per run (label, preset, self model, seed, status, held-out accuracy
  before and after and over steps, every split after training (the initial student's in
  ``reference``), route fractions and per-route losses at every step and at the end, wall and CPU
  seconds), and the summary per label;
- ``DIR/compare.md``: mean and standard deviation over seeds per label, the differences to the
  baseline, failed runs with their error;
- ``DIR/compare.png``: held-out accuracy over steps, one line per label with a band (+- std over seeds).

Run names: a preset (``dopd``, ``vanilla_opd``, ...), an ablation ``dopd_no_LH|LL|HT|HS`` (DOPD with
that route's weight set to 0: its tokens get no supervision), optionally ``@live|@frozen|@ema`` for the
privileged self (default: the task's).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from dopd.config import PRESETS, SELF_MODELS, ConfigError, TrainConfig, apply_overrides, resolve_config

ROUTE_NAMES = ("LH", "LL", "HT", "HS")
ABLATIONS = tuple(f"dopd_no_{r}" for r in ROUTE_NAMES)
#: Presets whose loss never reads the privileged self: one run per seed whatever the self model.
TEACHER_ONLY = ("vanilla_opd", "vanilla_opd_sampled", "gkd")


@dataclass(frozen=True)
class RunSpec:
    """One run of a comparison: what differs from the common config."""

    label: str
    preset: str
    seed: int
    self_model: Optional[str] = None  # None: the common config's
    ablation: Optional[str] = None  # the route whose weight is 0 (dopd_no_X)

    @property
    def name(self) -> str:
        """Directory name of the run under ``DIR/runs/``."""
        return f"{self.label.replace('@', '-')}-seed{self.seed}"

    def overrides(self) -> dict[str, Any]:
        """TrainConfig fields this run sets on top of the common config."""
        out: dict[str, Any] = {"preset": self.preset, "seed": self.seed}
        if self.self_model is not None:
            out["self_model"] = self.self_model
        if self.ablation is not None:
            from dopd_kernels.config import DOPD_ROUTES

            routes = [dataclasses.asdict(r) for r in DOPD_ROUTES]
            routes[ROUTE_NAMES.index(self.ablation)]["weight"] = 0.0
            out["loss"] = {"routes": routes}
        return out


def parse_runs(names: Sequence[str], seeds: Sequence[int], self_models: Sequence[str] = ()) -> list[RunSpec]:
    """RunSpecs for ``names`` (presets, ablations, ``NAME@SELF``) x ``seeds``, crossed with
    ``self_models`` for the names that read the self; ConfigError on an unknown name."""
    specs: list[tuple[str, str, Optional[str], Optional[str]]] = []
    for raw in names:
        base, _, self_model = raw.partition("@")
        if base in PRESETS:
            preset, ablation = base, None
        elif base in ABLATIONS:
            preset, ablation = "dopd", base.rsplit("_", 1)[1]
        else:
            raise ConfigError(f"presets: unknown run {raw!r}; use a preset {PRESETS}, an ablation {ABLATIONS}, "
                              f"optionally with @{'|@'.join(SELF_MODELS)}")
        if self_model and self_model not in SELF_MODELS:
            raise ConfigError(f"presets: unknown self model in {raw!r}; expected one of {SELF_MODELS}")
        crossed = [self_model] if self_model else (list(self_models) if base not in TEACHER_ONLY else []) or [None]
        for sm in crossed:
            label = base + (f"@{sm}" if sm and (self_model or len(self_models) > 1) else "")
            specs.append((label, preset, sm, ablation))
    labels = [s[0] for s in specs]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"presets: a run is listed twice ({labels})")
    # Seed-major order: the first finished runs already cover every label.
    return [RunSpec(label, preset, seed, sm, abl) for seed in seeds for (label, preset, sm, abl) in specs]


# ---------------------------------------------------------------------------------------------- worker
def _score(model: Any, tokenizer: Any, template: Any, path: str, config: TrainConfig) -> float:
    """Greedy held-out accuracy of a loaded model on the records at ``path``."""
    from dopd.data import load_records
    from dopd.evaluate import evaluate

    return evaluate(model, tokenizer, template, load_records(path, require_privileged=False),
                    max_new_tokens=config.max_new_tokens, batch_size=config.eval_batch_size,
                    marker=config.answer_marker)["accuracy"]


def run_one(spec: RunSpec, config: dict[str, Any], splits: dict[str, str], eval_split: str = "heldout") -> dict[str, Any]:
    """Train one run (in a worker process; ``eval_split`` is the split its ``eval_data`` scores over the
    steps) and score it on every split; never raises: a failure is returned as ``status: "failed"`` with
    the error, so the table can show it."""
    import resource

    import torch

    from dopd.metrics import read_metrics

    torch.set_num_threads(1)  # one process per core; the tiny models gain nothing from threads
    t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    out: dict[str, Any] = {**dataclasses.asdict(spec), "name": spec.name, "status": "ok", "error": None}
    cfg = apply_overrides(TrainConfig(), config)
    os.makedirs(cfg.output_dir, exist_ok=True)
    log_path = os.path.join(cfg.output_dir, "train.log")
    try:
        from transformers.utils import logging as hf_logging

        from dopd.trainer import Trainer

        hf_logging.disable_progress_bar()
        with open(log_path, "w") as log_fh:
            trainer = Trainer(cfg, log=lambda s: print(s, file=log_fh, flush=True))
            summary = trainer.train()
            after = {name: _score(trainer.student, trainer.tokenizer, trainer.template, path, cfg)
                     for name, path in splits.items() if name != eval_split}
        rows = read_metrics(cfg.output_dir)
        train_rows = [r for r in rows if "loss" in r]
        keys = ["loss"] + [f"{k}/{r}" for k in ("frac", "loss") for r in ROUTE_NAMES]
        tail = train_rows[-max(1, len(train_rows) // 10):]  # "final": the mean of the last tenth of the steps
        out.update(
            accuracy_before=summary.get("accuracy_before"), accuracy_after=summary.get("accuracy_after"),
            accuracy_over_steps=[[r["step"], r["eval/accuracy"]] for r in rows if "eval/accuracy" in r],
            splits_after={eval_split: summary.get("accuracy_after"), **after},
            route_fractions={r: sum(t[f"frac/{r}"] for t in tail) / len(tail) for r in ROUTE_NAMES},
            route_losses={r: sum(t[f"loss/{r}"] for t in tail) / len(tail) for r in ROUTE_NAMES},
            series={"step": [r["step"] for r in train_rows], **{k: [r[k] for r in train_rows] for k in keys}},
            examples=(summary.get("examples") or [])[:3],
        )
    except Exception as err:  # reported, not dropped: the comparison must show a failed run
        out.update(status="failed", error=f"{type(err).__name__}: {err}",
                   traceback=traceback.format_exc(limit=8)[-4000:])
    c1 = resource.getrusage(resource.RUSAGE_SELF)
    out.update(wall_s=time.perf_counter() - t0, cpu_s=(c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime),
               output_dir=cfg.output_dir)
    return out


# ---------------------------------------------------------------------------------------------- driver
def _machine() -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(), "load_avg": list(os.getloadavg()), "torch": torch.__version__}


def prepare_common(base: TrainConfig, log: Callable[[str], None]) -> tuple[TrainConfig, dict[str, str], dict]:
    """Prepare the task once: models, ``DIR/data/`` files, the teacher's and the initial student's
    accuracy on every split. Returns (common config, split paths, reference numbers)."""
    from dopd.tasks.base import accuracy
    from dopd.tasks.registry import get_task

    task = get_task(base.task)
    common, ref = task.prepare(base, log=log, teacher_reference=False)
    splits = {k: v for k, v in ref["paths"].items() if k != "train"}
    reference = {"teacher": {}, "student_before": {}}
    for name, path in splits.items():
        reference["teacher"][name] = accuracy(common.teacher, common, task, path)
        reference["student_before"][name] = accuracy(common.student, common, task, path)
    log("teacher (no hint): " + ", ".join(f"{k} {v:.3f}" for k, v in reference["teacher"].items()))
    log("student before:    " + ", ".join(f"{k} {v:.3f}" for k, v in reference["student_before"].items()))
    return common, splits, reference


def run_compare(base: TrainConfig, specs: Sequence[RunSpec], output_dir: str, jobs: int = 0,
                log: Callable[[str], None] = print, eval_split: str = "heldout") -> dict[str, Any]:
    """Run ``specs`` on the built-in task of ``base`` and write compare.json/.md/.png into ``output_dir``.

    ``eval_split``: the split scored over the steps (the curves); ``heldout`` for results, ``dev`` for
    choosing settings without looking at the held-out split. Every split is scored after training.
    """
    import multiprocessing

    from dopd.compare_report import summarize, write_reports

    started, t0 = datetime.datetime.now().astimezone(), time.perf_counter()
    machine = _machine()
    os.makedirs(output_dir, exist_ok=True)
    common, splits, reference = prepare_common(dataclasses.replace(base, output_dir=output_dir), log)
    if eval_split not in splits:
        raise ConfigError(f"eval_split must be one of {sorted(splits)} at task size {common.task_size}, "
                          f"got {eval_split!r}")
    common = dataclasses.replace(common, eval_data=splits[eval_split])
    common_dict = common.to_dict()
    jobs = jobs or min(len(specs), machine["cpus_usable"] or 1)
    log(f"{len(specs)} runs, {jobs} at a time")
    results: list[dict[str, Any]] = []
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {}
        for spec in specs:
            cfg = {**common_dict, **spec.overrides(), "output_dir": os.path.join(output_dir, "runs", spec.name),
                   "progress": False, "resume": False}
            futures[pool.submit(run_one, spec, cfg, splits, eval_split)] = spec
        for fut in as_completed(futures):
            spec = futures[fut]
            try:
                res = fut.result()
            except Exception as err:  # the worker process itself died
                res = {**dataclasses.asdict(spec), "name": spec.name, "status": "failed",
                       "error": f"{type(err).__name__}: {err}"}
            results.append(res)
            if res["status"] == "ok":
                log(f"[{len(results)}/{len(specs)}] {spec.label} seed {spec.seed}: {eval_split} "
                    f"{res['accuracy_before']:.3f} -> {res['accuracy_after']:.3f} ({res['wall_s']:.0f} s)")
            else:
                log(f"[{len(results)}/{len(specs)}] {spec.label} seed {spec.seed}: FAILED {res['error']}")
    order = {s.name: i for i, s in enumerate(specs)}
    results.sort(key=lambda r: order[r["name"]])
    machine["load_avg_end"] = list(os.getloadavg())
    report = {
        "task": common.task or _default_task(), "task_size": common.task_size, "date": started.isoformat(timespec="seconds"),
        "machine": machine, "jobs": jobs, "wall_s": time.perf_counter() - t0, "eval_split": eval_split,
        "cpu_s": sum(r.get("cpu_s", 0.0) for r in results), "config": common_dict,
        "splits": {k: _count_lines(p) for k, p in splits.items()}, "reference": reference,
        "runs": results,
    }
    report["summary"] = summarize(results, reference)
    write_reports(report, output_dir)
    return report


def _count_lines(path: str) -> int:
    with open(path, encoding="utf-8") as fh:
        return sum(1 for line in fh if line.strip())


def _default_task() -> str:
    from dopd.tasks.registry import DEFAULT_TASK

    return DEFAULT_TASK


# ---------------------------------------------------------------------------------------------- CLI
def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_compare_parser(sub: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Register ``dopd compare`` on the CLI's subparsers (``parents``: the CLI's common flags)."""
    cp = sub.add_parser("compare", help="presets x seeds on a built-in task -> compare.json/.md/.png",
                        parents=list(parents))
    cp.add_argument("--output-dir", required=True, help="where the runs, data and reports go")
    cp.add_argument("--task", help="a built-in task (default: the default task)")
    cp.add_argument("--task-size", default="full", help="full (default) | small (quick looks) | tiny (seconds)")
    cp.add_argument("--presets", default="dopd,vanilla_opd,opsd,sdpo,gkd",
                    help="comma-separated presets, ablations dopd_no_LH|LL|HT|HS, NAME@live|frozen|ema "
                         "(default: dopd,vanilla_opd,opsd,sdpo,gkd)")
    cp.add_argument("--ablations", action="store_true", help="add dopd_no_LH, dopd_no_LL, dopd_no_HT, dopd_no_HS")
    cp.add_argument("--self-models", default="", help="comma-separated self models to cross with the presets "
                                                      "that read the self (default: the task's)")
    cp.add_argument("--seeds", type=int, default=3, help="number of seeds: 0, 1, ..., N-1 (default: 3)")
    cp.add_argument("--jobs", type=int, default=0, help="parallel runs (0: one per usable core)")
    cp.add_argument("--max-steps", type=int, help="steps per run (default: the task's)")
    cp.add_argument("--eval-every", type=int, help="evaluation every N steps (default: the task's)")
    cp.add_argument("--eval-split", default="heldout", help="the split scored over the steps: heldout (default; "
                                                           "results) or dev (choosing settings; --task-size small)")
    cp.add_argument("--cache-dir", help="where the task's teacher and student are cached")
    cp.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a TrainConfig field for every run, e.g. learning_rate=1e-3 (repeatable)")


def run_compare_command(args: argparse.Namespace) -> int:
    """``dopd compare``: parse, check everything before any model is built, run, print the table."""
    import yaml

    from dopd.distributed import launched_by_torchrun

    if launched_by_torchrun() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("dopd compare runs its jobs as separate processes on one machine (--jobs); launch it "
                          "without torchrun (each job is an ordinary single-process `dopd train`)")

    if args.seeds < 1:
        raise ConfigError(f"seeds must be >= 1, got {args.seeds}")
    if args.jobs < 0:
        raise ConfigError(f"jobs must be >= 0, got {args.jobs}")
    flags: dict[str, Any] = {"task_size": args.task_size}
    for name in ("task", "max_steps", "eval_every", "cache_dir"):
        if getattr(args, name) is not None:
            flags[name] = getattr(args, name)
    for item in args.set:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"--set expects FIELD=VALUE, got {item!r}")
        flags[key.strip().replace("-", "_")] = yaml.safe_load(value)
    for name in ("student", "teacher", "data", "preset", "seed", "output_dir"):
        if name in flags:
            raise ConfigError(f"--set {name}=...: compare sets {name} itself")
    base = resolve_config(None, flags)
    names = _csv(args.presets) + (list(ABLATIONS) if args.ablations else [])
    specs = parse_runs(names, list(range(args.seeds)), _csv(args.self_models))
    report = run_compare(base, specs, args.output_dir, jobs=args.jobs, eval_split=args.eval_split)
    print(open(os.path.join(args.output_dir, "compare.md")).read())
    failed = [r for r in report["runs"] if r["status"] != "ok"]
    return 1 if failed and len(failed) == len(report["runs"]) else 0
