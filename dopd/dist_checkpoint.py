"""Saving and resuming a run on any number of ranks (a single process included).

``DIR/checkpoint-<step>/`` holds:

- ``config.json``, ``model.safetensors``, tokenizer files: the student as a plain transformers model, written
  by rank 0 with ``save_pretrained`` from the full state dict (under FSDP2 gathered from the shards onto the
  CPU), so ``from_pretrained`` and ``dopd eval`` read it as they read any model;
- ``optimizer/``: ``torch.distributed.checkpoint`` (DCP) of AdamW's state, sharded like the parameters
  (each rank writes its own shards), with the LR schedule, the fp16 loss scaler and an EMA self's weights;
- ``rng/rank-<r>.pt``: every RNG state rank r's steps read;
- ``trainer_state.pt``: step, world size, ``--parallel`` and the config, written by rank 0 last.

Resuming with the same world size restores all of it: the run continues exactly. With another world size
DCP reshards the optimizer state onto the new ranks (the weights come whole from the model files), the data
order (a function of seed and step) is unchanged, and each rank's sampler is re-seeded from (seed, rank,
step); the log says so, since the samples then differ from an uninterrupted run's. The output directory must
be one filesystem for every rank (shared between nodes).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch

from dopd.checkpoint import STATE_FILE, list_checkpoints, load_state, rng_state, seed_all, set_rng_state
from dopd.distributed import DistContext
from dopd.parallel import full_state_dict

OPTIMIZER_DIR = "optimizer"
RNG_DIR = "rng"


@dataclass
class ResumeInfo:
    """What a resumed run needs to know about the checkpoint it continues."""

    step: int
    world_size: int
    parallel: str
    resharded: bool  # the checkpoint was written by another number of ranks
    extra: dict[str, Any] = field(default_factory=dict)


def _training_state(student: torch.nn.Module, optimizer: Any, scheduler: Any, scaler: Any,
                    models: dict[str, torch.nn.Module]) -> dict[str, Any]:
    """The DCP state dict: the optimizer's (keyed by parameter names, sharded like them), schedule, scaler,
    and the weights of ``models`` (e.g. an EMA self; sharded or not, as they are)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"optimizer": get_optimizer_state_dict(student, optimizer), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), **{name: get_model_state_dict(m) for name, m in models.items()}}


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns on every single-process save and load that it assumes a single process: it is right."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def save_checkpoint(output_dir: str, step: int, *, student: torch.nn.Module, tokenizer: Any, optimizer: Any,
                    scheduler: Any, scaler: Any, ctx: DistContext, parallel: str, keep: int,
                    extra: Optional[dict[str, Any]] = None, models: Optional[dict[str, torch.nn.Module]] = None) -> str:
    """Write ``checkpoint-<step>`` (every rank calls this) and keep the newest ``keep``; return its path.

    ``extra`` (plain data) goes to ``trainer_state.pt``; the weights of ``models`` go with the optimizer's state.
    """
    import torch.distributed.checkpoint as dcp

    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, RNG_DIR))
    ctx.barrier()
    with _quiet_single_process():
        dcp.save(_training_state(student, optimizer, scheduler, scaler, models or {}), checkpoint_id=os.path.join(tmp, OPTIMIZER_DIR),
                 process_group=ctx.group, no_dist=not ctx.enabled)
    torch.save(rng_state(), os.path.join(tmp, RNG_DIR, f"rank-{ctx.rank}.pt"))
    weights = full_state_dict(student, ctx) if _is_sharded(student) else None  # a collective under FSDP2
    if ctx.is_main:
        student.save_pretrained(tmp, state_dict=weights)
        tokenizer.save_pretrained(tmp)
    ctx.barrier()  # every rank's shards and RNG state are on disk
    if ctx.is_main:
        torch.save({"step": step, "world_size": ctx.world_size, "parallel": parallel, **(extra or {})},
                   os.path.join(tmp, STATE_FILE))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    ctx.barrier()  # no rank reads the directory before it is complete
    return final


def load_checkpoint(path: str, *, student: torch.nn.Module, optimizer: Any, scheduler: Any, scaler: Any,
                    ctx: DistContext, seed: int, log: Callable[[str], None],
                    models: Optional[dict[str, torch.nn.Module]] = None) -> ResumeInfo:
    """Restore optimizer, schedule, scaler, the weights of ``models`` and the RNG from ``path`` (every rank
    calls this; the student's weights were loaded from the same directory). Call it last in set-up: it sets
    the RNG state step 1 reads."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    from dopd.config import ConfigError

    meta = load_state(path)
    models = models or {}
    state = _training_state(student, optimizer, scheduler, scaler, models)
    sharded = os.path.join(path, OPTIMIZER_DIR)
    if not os.path.exists(os.path.join(sharded, ".metadata")):  # e.g. a checkpoint of an older dopd
        raise ConfigError(f"--resume: {path} has no sharded optimizer state ({sharded}/.metadata); it was written "
                          "by another version of dopd or not completely: start a fresh run or pick another checkpoint")
    try:
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=sharded, process_group=ctx.group, no_dist=not ctx.enabled)
    except BaseException as err:  # CheckpointException derives from BaseException: name it, one line
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        raise ConfigError(f"--resume: reading the sharded state in {sharded} failed: {err}") from err
    set_optimizer_state_dict(student, optimizer, state["optimizer"])
    for name, model in models.items():
        set_model_state_dict(model, state[name])
    scheduler.load_state_dict(state["scheduler"])
    if state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    step, saved_world = int(meta["step"]), int(meta.get("world_size", 1))
    info = ResumeInfo(step, saved_world, str(meta.get("parallel", "ddp")), saved_world != ctx.world_size,
                      {k: v for k, v in meta.items() if k not in ("step", "world_size", "parallel")})
    if info.resharded:
        seed_all(ctx.rank_seed(seed) + 7919 * step)
        log(f"resuming a checkpoint of {saved_world} rank(s) on {ctx.world_size}: weights and optimizer state "
            f"resharded; each rank's sampler re-seeded from (seed, rank, step), so the samples differ from an "
            f"uninterrupted run's")
    else:
        set_rng_state(torch.load(os.path.join(path, RNG_DIR, f"rank-{ctx.rank}.pt"), map_location="cpu",
                                 weights_only=False))
    return info
