"""Worker of test_distributed.py, one process per rank under ``torchrun --nproc_per_node 2`` (gloo, CPU).

    dopd_dist_worker.py step   OUT CONFIG.json TIED.json
                                                one step with fixed rollouts per (parallel, self model, reduction);
                                                local routing statistics; a non-finite loss on rank 1; with the
                                                tied-embedding models of TIED.json: one step (ddp, fsdp; frozen,
                                                EMA self), greedy responses after it, and its checkpoint
    dopd_dist_worker.py resume OUT CONFIG.json  4 steps straight vs 2 + resume + 2, ddp and fsdp (EMA self)
    dopd_dist_worker.py fail   MODE -- ARGS     ``dopd train ARGS`` with rank 1 failing at step 1:
                                                MODE raise (bad data) or hang (never answers)

Results go to ``OUT/<name>-rank<r>.pt`` for the test to compare with one process.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _dist_common import (FixedRolloutTrainer, full_grads_and_params, greedy_responses,  # noqa: E402
                          step_config, whole_params, whole_tensor)

from dopd.config import TrainConfig, apply_overrides  # noqa: E402
from dopd.distributed import DistContext, init_distributed, shutdown  # noqa: E402
from dopd.trainer import Trainer  # noqa: E402


def _load_config(path: str) -> TrainConfig:
    with open(path) as fh:
        return apply_overrides(TrainConfig(), json.load(fh))


def _silent(_message: str) -> None:
    pass


def one_step(trainer: FixedRolloutTrainer, every_name: bool = False) -> dict:
    """Set up, run one optimizer step recording the clipped gradients the optimizer sees, and the result.

    ``every_name``: a tied head's gradient and weight under both names (lm_head and embed_tokens), and
    whether they are still one tensor after the step (the student's and an EMA self's).
    """
    trainer.setup()
    seen = {}
    trainer.optimizer.register_step_pre_hook(
        lambda *_: seen.update(grads=full_grads_and_params(trainer, every_name)[0]))
    row = trainer.train_step()
    _, params = full_grads_and_params(trainer, every_name)
    out = trainer.outputs[-1]
    from torch.distributed.tensor import DTensor

    def rows_here(w):  # rows of the weight this rank holds
        return (w.to_local() if isinstance(w, DTensor) else w).shape[0]

    layout = {"student_head_rows": rows_here(trainer.student.get_output_embeddings().weight),
              "teacher_head_rows": rows_here(trainer.teacher.get_output_embeddings().weight),
              "teacher_embed_rows": rows_here(trainer.teacher.get_input_embeddings().weight)}
    ema = whole_params(trainer.self_ema.model, every_name) if trainer.self_ema is not None else None
    student = trainer.student
    head, embed = student.get_output_embeddings().weight, student.get_input_embeddings().weight
    tied = {"same_tensor": head is embed, "equal": torch.equal(whole_tensor(head), whole_tensor(embed)),
            "config": bool(student.config.tie_word_embeddings)}
    return {"layout": layout, "row": row, "ema": ema, "grads": seen["grads"], "params": params, "route": out.route.cpu(),
            "thresholds": {k: v.detach().cpu() for k, v in out.thresholds.items()},
            "stats_group": trainer.loss_config.stats_group is not None, "tied": tied}


def run_step(out_dir: str, config_path: str, tied_config_path: str) -> None:
    cfg = _load_config(config_path)
    ctx = init_distributed("cpu", 120)
    results = {}
    # Tied embeddings (lm_head is embed_tokens, as in Qwen3, Gemma, Llama-3.2): one step, greedy responses (a
    # forward without backward, as an evaluation: under fsdp it leaves the root gathered), then the checkpoint
    # (under fsdp gathered from the shared shard) for the test to reload with transformers.
    tied_cfg = _load_config(tied_config_path)
    for parallel in ("ddp", "fsdp"):
        for self_model in ("frozen", "ema"):
            name = f"tied-{parallel}-{self_model}"
            trainer = FixedRolloutTrainer(step_config(tied_cfg, parallel=parallel, self_model=self_model,
                                                      output_dir=os.path.join(out_dir, name)), log=_silent)
            results[name] = one_step(trainer, every_name=True)
            results[name]["greedy"] = greedy_responses(trainer)
            results[name]["checkpoint"] = trainer.save()
    for parallel in ("ddp", "fsdp"):
        for self_model in ("frozen", "live", "ema"):
            name = f"{parallel}-{self_model}"
            run = step_config(cfg, parallel=parallel, self_model=self_model, output_dir=os.path.join(out_dir, name))
            results[name] = one_step(FixedRolloutTrainer(run, log=_silent))
        # token_mean: each rank's loss weighted by its share of the all-reduced token count
        run = step_config(cfg, parallel=parallel, loss={"reduction": "token_mean"},
                          output_dir=os.path.join(out_dir, f"{parallel}-token_mean"))
        results[f"{parallel}-token_mean"] = one_step(FixedRolloutTrainer(run, log=_silent))
    # fp16 under FSDP2: an overflow in one rank's gradient shard skips the step on every rank.
    fp16 = FixedRolloutTrainer(step_config(cfg, parallel="fsdp", dtype="float16", output_dir=os.path.join(out_dir, "fp16")),
                               log=_silent)
    fp16.setup()
    before = full_grads_and_params(fp16)[1]
    real_unscale, scale = fp16.scaler.unscale_, float(fp16.scaler.get_scale())

    def overflow_on_rank1(optimizer):
        if ctx.rank == 1:
            next(p for p in fp16.student.parameters() if p.grad is not None).grad.to_local().view(-1)[0] = float("inf")
        return real_unscale(optimizer)

    fp16.scaler.unscale_ = overflow_on_rank1
    fp16.train_step()
    after = full_grads_and_params(fp16)[1]
    results["fp16"] = {"scaler": type(fp16.scaler).__name__, "scale": (scale, float(fp16.scaler.get_scale())),
                       "unchanged": all(torch.equal(before[k], after[k]) for k in before)}
    # Per-rank routing statistics: the routes of this rank's share alone.
    local = FixedRolloutTrainer(step_config(cfg, local_routing_stats=True, output_dir=os.path.join(out_dir, "local")),
                                log=_silent)
    local.setup()
    from dopd.trainer import batch_indices

    idx = ctx.share(batch_indices(0, len(local.records), local.config.prompts_per_step, local.config.seed), "prompts")
    with torch.no_grad():
        out, _ = local.micro_batch([local.records[i] for i in idx])
    results["local"] = {"route": out.route.cpu(), "stats_group": local.loss_config.stats_group is not None}
    # A non-finite loss on rank 1 only: every rank stops before the optimizer step, naming rank 1.
    nan = FixedRolloutTrainer(step_config(cfg, output_dir=os.path.join(out_dir, "nan")), log=_silent)
    nan.setup()
    real = nan.micro_batch

    def poisoned(records):
        out, stats = real(records)
        if ctx.rank == 1:
            out.loss = out.loss * float("nan")
        return out, stats

    nan.micro_batch = poisoned
    before = [p.detach().clone() for p in nan.student.parameters()]
    try:
        nan.train_step()
        results["nan"] = {"error": None}
    except FloatingPointError as err:
        results["nan"] = {"error": str(err), "step": nan.step,
                          "unchanged": all(torch.equal(a, p.detach()) for a, p in zip(before, nan.student.parameters()))}
    torch.save(results, os.path.join(out_dir, f"step-rank{ctx.rank}.pt"))
    shutdown(ctx)


def run_resume(out_dir: str, config_path: str) -> None:
    cfg = _load_config(config_path)
    ctx = init_distributed("cpu", 120)
    from dataclasses import replace

    for parallel in ("ddp", "fsdp"):
        root = os.path.join(out_dir, parallel)
        # fsdp with an EMA self: its sharded weights go through the checkpoint too
        common = dict(max_steps=4, save_every=2, keep_checkpoints=5, eval_data=None, grad_accum=2, prompts_per_step=2,
                      num_generations=2, progress=False, parallel=parallel,
                      self_model="ema" if parallel == "fsdp" else cfg.self_model)
        Trainer(replace(cfg, **common, output_dir=os.path.join(root, "straight")), log=_silent).train()
        if ctx.is_main:  # "interrupted" after step 2: a fresh directory holding only what existed then
            shutil.copytree(os.path.join(root, "straight", "checkpoint-2"), os.path.join(root, "resumed", "checkpoint-2"))
        ctx.barrier()
        resumed = Trainer(replace(cfg, **common, output_dir=os.path.join(root, "resumed"), resume=True), log=_silent)
        resumed.setup()
        assert resumed.step == 2, resumed.step
        resumed.train()
    shutdown(ctx)


def run_fail(mode: str, argv: list[str]) -> int:
    """``dopd train ARGV`` where rank 1's first micro-batch fails (``raise``) or never returns (``hang``)."""
    from dopd import cli
    from dopd.data import DataError

    real = Trainer.micro_batch

    def failing(self, records):
        if DistContext.current().rank == 1:
            if mode == "raise":
                raise DataError("record 3: cannot render the prompt (simulated bad data on this rank)")
            time.sleep(600)
        return real(self, records)

    Trainer.micro_batch = failing
    return cli.main(["train", *argv])


if __name__ == "__main__":
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    what = sys.argv[1]
    if what == "step":
        run_step(sys.argv[2], sys.argv[3], sys.argv[4])
    elif what == "resume":
        run_resume(sys.argv[2], sys.argv[3])
    elif what == "fail":
        sys.exit(run_fail(sys.argv[2], sys.argv[4:]))
    else:
        raise SystemExit(f"unknown scenario {what!r}")
