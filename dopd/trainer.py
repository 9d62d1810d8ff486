"""The step loop: rollouts -> three contexts -> three hidden-state passes -> routed loss -> AdamW.

One optimizer step takes ``grad_accum`` micro-batches of ``prompts_per_step`` prompts, each with
``num_generations`` sampled responses. The teacher is frozen; the self pass runs under no_grad with the
privileged context, on the live student or a frozen/EMA copy (``dopd.self_model``). Data order is a
function of (seed, micro-step) alone, and the RNG state is checkpointed, so ``--resume`` reproduces an uninterrupted run exactly.
Everything that can be checked without weights is checked first (``dopd.preflight``); dtypes follow
``dopd.precision`` (fp32 masters, autocast compute); logit post-processing follows ``passes.logit_transform``.

The same loop runs on one process or on every rank of a torchrun launch (``dopd.distributed``): each rank
takes its share of each micro-batch's prompts from the same seeded order and samples with its own seed;
the student is wrapped by DDP or FSDP2 (``dopd.parallel``) and everything done with it goes through
``dopd.distill.DistillModule``'s forward; routing statistics, the loss normalization, gradient clipping,
metrics and evaluation are global (``dopd.step_metrics``); checkpoints are ``dopd.dist_checkpoint``'s.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from typing import Any, Callable, Optional, Sequence

import torch

from dopd.checkpoint import latest_checkpoint
from dopd.config import ConfigError, TrainConfig
from dopd.data import PromptTemplate, Record
from dopd.dist_checkpoint import load_checkpoint, save_checkpoint
from dopd.distill import DistillModule, LossInputs
from dopd.distributed import DistContext, rank_device
from dopd.evaluate import score, summarize
from dopd.metrics import MetricsLogger
from dopd.modeling import load_causal_lm, maybe_apply_liger
from dopd.parallel import clip_grad_norm, grad_scaler, no_sync, reshard, shard_frozen, wrap_student
from dopd.passes import build_pass_batch, output_projection, response_hidden, verify_logit_transform
from dopd.preflight import check_flags, check_run, route_config  # noqa: F401  (route_config: re-exported)
from dopd.rollout import Rollout
from dopd.self_model import make_self_model
from dopd.step_metrics import global_metrics, rank_loss_weight


def batch_indices(micro_step: int, num_records: int, size: int, seed: int) -> list[int]:
    """Record indices of one micro-batch: consecutive slices of per-epoch seeded permutations."""
    out: list[int] = []
    pos = micro_step * size
    while len(out) < size:
        epoch, offset = divmod(pos, num_records)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(num_records, generator=gen).tolist()
        take = perm[offset: offset + size - len(out)]
        out.extend(take)
        pos += len(take)
    return out


def template_from(config: TrainConfig) -> PromptTemplate:
    """The PromptTemplate the config describes."""
    return PromptTemplate(student_template=config.student_template, privileged_template=config.privileged_template,
                          response_prefix=config.response_prefix, use_chat_template=config.use_chat_template)


def check_world(config: TrainConfig, ctx: DistContext) -> None:
    """What the number of ranks requires of the config (a ConfigError naming the flag)."""
    if ctx.enabled and config.prompts_per_step % ctx.world_size:
        raise ConfigError(f"--prompts-per-step {config.prompts_per_step} must be a multiple of the {ctx.world_size} "
                          "ranks: it is the global number of prompts per micro-batch, and each rank takes an equal share")


class Trainer:
    """Runs ``config`` end to end: setup (checks first, then models), train, checkpoints, evaluation.

    ``dist`` is this process's place among the ranks (default: the initialized process group, if any; else
    a single process). Every rank constructs and runs its own Trainer; only rank 0 logs and writes.
    """

    def __init__(self, config: TrainConfig, log: Callable[[str], None] = print,
                 dist: Optional[DistContext] = None) -> None:
        self.config = config.validate()
        self.dist = dist if dist is not None else DistContext.current()
        self.log = log if self.dist.is_main else (lambda message: None)
        self.template = template_from(config)

    # ----------------------------------------------------------------- setup
    def setup(self) -> None:
        """Check everything that needs no weights (``dopd.preflight``), then load models, optimizer and
        schedule; wrap for the ranks; resume. Nothing is written to the output directory before the models loaded."""
        cfg, ctx = self.config, self.dist
        check_world(cfg, ctx)
        # data, loss options, device (this rank's), model configs, logit transforms, tokenizers; rank 0 warns
        mine = dataclasses.replace(cfg, device=rank_device(cfg.device, ctx.local_rank if ctx.enabled else None))
        plan = check_run(mine, check_flags(mine, warn=ctx.is_main))
        self.records, self.eval_records, self.tokenizer = plan.records, plan.eval_records, plan.tokenizer
        self.loss_config, self.device, self.precision = plan.loss_config, plan.device, plan.precision
        if ctx.enabled and not cfg.local_routing_stats:  # the paper's batch statistics: over the global batch
            self.loss_config = self.loss_config.replace(stats_group=ctx.group)
        self.transforms = plan.transforms
        # Rank 0 decides (one filesystem for all ranks, but never two answers to "which checkpoint").
        self.resume_from = ctx.broadcast_object(latest_checkpoint(cfg.output_dir) if cfg.resume else None)
        if cfg.resume and self.resume_from is None:
            self.log(f"--resume: no checkpoint in {cfg.output_dir}; starting from step 0")
        student_path = self.resume_from or cfg.student
        # Models: the student in fp32 (the masters), frozen models in the compute dtype (dopd.precision).
        # Loaded under the same seed on every rank: a weight that from_pretrained initializes (a missing key) is
        # then the same everywhere (DDP re-broadcasts only the student). Rank r > 0 switches to its own sampling
        # seed after wrapping, below; rank 0 keeps this stream, so it samples like a single process.
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        prec = self.precision
        self.fsdp = ctx.enabled and cfg.parallel == "fsdp"
        # FSDP2 moves each rank's shards to the device: load on the CPU so that no rank holds a whole model there.
        load_to = torch.device("cpu") if self.fsdp else self.device
        self.student = load_causal_lm(student_path, prec.param_dtype, load_to, trainable=True)
        self.teacher = load_causal_lm(cfg.teacher, prec.frozen_dtype, load_to, trainable=False)
        # A frozen self is the *initial* student (cfg.student, also after --resume), never trained; an
        # EMA self starts as the student (in the masters' dtype) and follows it after every optimizer step.
        # Either is sharded like the teacher below.
        self.self_model, self.self_ema = make_self_model(
            cfg.self_model, cfg.self_ema_decay, self.student,
            lambda: load_causal_lm(cfg.student, prec.frozen_dtype, load_to, trainable=False))
        # The configs promised these logits; check on a few tokens that the loaded classes agree.
        verify_logit_transform(self.student, self.transforms["student_transform"], f"--student {cfg.student}")
        verify_logit_transform(self.teacher, self.transforms["teacher_transform"], f"--teacher {cfg.teacher}")
        for m in (self.student, self.teacher):
            if maybe_apply_liger(m, self.device, cfg.use_liger):
                self.log(f"Liger-Kernel patches applied to {type(m).__name__}")
        # Under FSDP2 the MixedPrecisionPolicy casts (no autocast); DDP and one process use autocast.
        self.student_module = wrap_student(DistillModule(self.student, prec, autocast=not self.fsdp), ctx,
                                           cfg.parallel, self.device, prec)
        self.teacher = shard_frozen(self.teacher, ctx, cfg.parallel, self.device, prec)
        if self.self_model is not None:
            self.self_model = shard_frozen(self.self_model, ctx, cfg.parallel, self.device, prec)
        if ctx.rank != 0:  # rank r samples with its own seed (rank_seed(seed) is seed itself on rank 0)
            torch.manual_seed(ctx.rank_seed(cfg.seed))
            random.seed(ctx.rank_seed(cfg.seed))
        from transformers import get_cosine_schedule_with_warmup

        # After wrapping: under FSDP2 the parameters are now this rank's DTensor shards (AdamW on the shards).
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=cfg.learning_rate,
                                           betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)
        self.scheduler = get_cosine_schedule_with_warmup(
            self.optimizer, num_warmup_steps=int(cfg.warmup_ratio * cfg.max_steps), num_training_steps=cfg.max_steps)
        self.scaler = grad_scaler(prec, self.device, ctx, cfg.parallel)
        self.step = 0
        if self.resume_from:  # last: it sets the RNG state that step 1 reads
            info = load_checkpoint(self.resume_from, student=self.student, optimizer=self.optimizer,
                                   scheduler=self.scheduler, scaler=self.scaler, ctx=ctx, seed=cfg.seed, log=self.log,
                                   models=self._checkpointed_models())
            self.step = info.step
            if self.self_ema is not None:
                ema = info.extra["self_ema"]
                self.self_ema.decay, self.self_ema.updates = float(ema["decay"]), int(ema["updates"])
            self.log(f"resumed from {self.resume_from} at step {self.step}")
        self.metrics: Optional[MetricsLogger] = None
        if ctx.is_main:
            os.makedirs(cfg.output_dir, exist_ok=True)
            with open(os.path.join(cfg.output_dir, "config.json"), "w") as fh:
                json.dump(cfg.to_dict(), fh, indent=2)
            self.metrics = MetricsLogger(cfg.output_dir, cfg.report_to, resume_step=self.step if self.resume_from
                                         else None, run_config=cfg.to_dict())

    # ----------------------------------------------------------------- evaluation
    def evaluate(self) -> Optional[dict[str, Any]]:
        """Greedy accuracy of the student on ``eval_data`` (None without eval data), sharded over the ranks:
        each scores a contiguous share and the results are gathered in order."""
        if not self.eval_records:
            return None
        recs = self.eval_records[: self.config.eval_limit or None]
        mine, real = self.dist.padded_share(recs)  # same number of generate calls on every rank
        # Evaluation must not move the training RNG, or eval_every would change the training run.
        rng = torch.get_rng_state()
        scored = score(None, self.tokenizer, self.template, mine, max_new_tokens=self.config.max_new_tokens,
                       batch_size=self.config.eval_batch_size, marker=self.config.answer_marker,
                       generate_fn=self._generate)[:real]
        torch.set_rng_state(rng)
        return summarize([row for part in self.dist.all_gather_objects(scored) for row in part])

    def _log_eval(self, result: Optional[dict[str, Any]]) -> None:
        if result is not None and self.metrics is not None:
            self.metrics.log(self.step, {"eval/accuracy": result["accuracy"], "eval/n": result["n"]})
            self.log(f"step {self.step}: eval accuracy {result['accuracy']:.3f} on {result['n']} prompts")

    # ----------------------------------------------------------------- training
    def _generate(self, _model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], **kwargs: Any) -> Rollout:
        """``dopd.rollout.generate`` through the wrapped student's forward (see ``dopd.distill``); no_grad out
        here too, so that DDP does not arm its gradient all-reduce for a forward that has no backward."""
        with torch.no_grad():
            return self.student_module("generate", tokenizer, prompts, **kwargs)

    def rollout(self, contexts: Sequence[Sequence[int]]) -> Rollout:
        """One sampled response per student context (the tests replace this with fixed responses)."""
        cfg = self.config
        return self._generate(None, self.tokenizer, contexts, max_new_tokens=cfg.max_new_tokens, do_sample=True,
                              temperature=cfg.temperature, top_p=cfg.top_p)

    def micro_batch(self, records: Sequence[Record]) -> tuple[Any, dict[str, Any]]:
        """Sample, run the three passes, return (RoutedLossOutput, {"rollout", "time/generate"}) for ``records``
        (this rank's share) with this run's models, precision and logit transforms."""
        cfg = self.config
        group = [r for r in records for _ in range(cfg.num_generations)]
        student_ctx = self.template.encode(self.tokenizer, group, privileged=False)
        privileged_ctx = self.template.encode(self.tokenizer, group, privileged=True)
        t0 = time.perf_counter()
        roll = self.rollout(student_ctx)
        t_gen = time.perf_counter() - t0
        pad, device = self.tokenizer.pad_token_id, self.device
        s_batch = build_pass_batch(student_ctx, roll.tokens, roll.mask, pad).to(device)
        p_batch = build_pass_batch(privileged_ctx, roll.tokens, roll.mask, pad).to(device)
        autocast = self.precision.autocast(device, enabled=not self.fsdp)
        with torch.no_grad():  # self: privileged context, stop-gradient (live student weights by default)
            if self.self_model is None:
                self_hidden = self.student_module("hidden", p_batch)
            else:
                with autocast:
                    self_hidden = response_hidden(self.self_model, p_batch)
            with autocast:
                teacher_hidden = response_hidden(self.teacher, p_batch)
        t_weight, t_bias = output_projection(self.teacher)
        self_proj = {}
        if self.self_model is not None:
            self_proj = dict(zip(("self_weight", "self_bias"), output_projection(self.self_model)))
        inputs = LossInputs(teacher_hidden, t_weight, t_bias, self_hidden, roll.tokens.to(device), roll.mask.to(device),
                            self.loss_config, cfg.loss_backend, transforms=self.transforms, **self_proj)
        _, out = self.student_module("loss", s_batch, inputs)
        return out, {"rollout": roll, "time/generate": t_gen}

    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns its metrics (over all ranks)."""
        cfg, ctx = self.config, self.dist
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        rows: list[dict[str, float]] = []
        bad: list[tuple[float, list[int]]] = []
        for k in range(cfg.grad_accum):
            idx = batch_indices(self.step * cfg.grad_accum + k, len(self.records), cfg.prompts_per_step, cfg.seed)
            mine = ctx.share(idx, "--prompts-per-step") if ctx.enabled else idx
            # DDP: all-reduce the gradients once per step, in the last micro-batch's backward.
            with no_sync(self.student_module, skip=k < cfg.grad_accum - 1):
                out, stats = self.micro_batch([self.records[i] for i in mine])
                weight = rank_loss_weight(out.route >= 0, self.loss_config.reduction, ctx)  # exact global mean
                self.scaler.scale(out.loss * weight / cfg.grad_accum).backward()  # fp16: scaled
            m, bad_ranks = global_metrics(out, weight, ctx, stats["rollout"].lengths)
            if bad_ranks or not math.isfinite(m["loss"]):
                bad.append((m["loss"], bad_ranks))
            m["student_entropy"] = -m.pop("student_logprob_mean")  # sampled-token estimate of the entropy
            m["time/generate"] = stats["time/generate"]
            rows.append(m)
        if bad:  # before the step: the weights stay as they were (every rank raises the same error)
            where = f" on rank(s) {bad[0][1]} of {ctx.world_size}" if ctx.enabled else ""
            raise FloatingPointError(f"non-finite loss at step {self.step + 1}{where}: {bad[0][0]}")
        self.scaler.unscale_(self.optimizer)  # clip the true gradients (a no-op without fp16)
        grad_norm = clip_grad_norm(self.student.parameters(), cfg.max_grad_norm)
        # A finite loss can still give inf/NaN gradients; without fp16's scaler (which skips such a step) they
        # would write NaN weights on every rank. The norm is global: every rank raises together.
        if not self.scaler.is_enabled() and not math.isfinite(float(grad_norm)):
            raise FloatingPointError(f"non-finite gradient norm at step {self.step + 1} (the loss was finite): "
                                     f"{float(grad_norm)}; the weights were not updated")
        lr = self.scheduler.get_last_lr()[0]
        self.scaler.step(self.optimizer)  # fp16: skipped when the scaled gradients overflowed
        self.scaler.update()
        self.scheduler.step()
        if self.self_ema is not None:
            self.self_ema.update(self.student)
        self.step += 1
        merged = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
        merged["n_tokens"] = sum(r["n_tokens"] for r in rows)  # over all ranks
        elapsed = time.perf_counter() - t0
        merged.update({"lr": lr, "grad_norm": float(grad_norm), "time/step": elapsed,
                       "tokens_per_s": merged["n_tokens"] / elapsed})
        return merged

    def save(self) -> str:
        """Checkpoint the current step (every rank calls this)."""
        reshard(self.student_module)  # e.g. right after an evaluation: the state dicts read the shards
        extra: dict[str, Any] = {"config": self.config.to_dict()}
        if self.self_ema is not None:  # its weights go with the optimizer state (sharded like the student's)
            extra["self_ema"] = {"decay": self.self_ema.decay, "updates": self.self_ema.updates}
        return save_checkpoint(self.config.output_dir, self.step, student=self.student, tokenizer=self.tokenizer,
                               optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler, ctx=self.dist,
                               parallel=self.config.parallel if self.dist.enabled else "none",
                               keep=self.config.keep_checkpoints, extra=extra, models=self._checkpointed_models())

    def _checkpointed_models(self) -> dict[str, torch.nn.Module]:
        """Models besides the student whose weights a checkpoint keeps (through DCP): the EMA self."""
        return {"self_ema": self.self_ema.model} if self.self_ema is not None else {}

    def train(self) -> dict[str, Any]:
        """Run to ``max_steps`` (from the resumed step); returns accuracy before/after when evaluated."""
        from tqdm.auto import tqdm

        cfg = self.config
        if not hasattr(self, "student"):
            self.setup()
        summary: dict[str, Any] = {"start_step": self.step}
        if self.step == 0:
            before = self.evaluate()
            self._log_eval(before)
            summary["accuracy_before"] = before and before["accuracy"]
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not (cfg.progress and self.dist.is_main),
                   desc=f"dopd[{cfg.preset}]")
        while self.step < cfg.max_steps:
            row = self.train_step()
            if self.metrics is not None and (self.step % cfg.log_every == 0 or self.step == cfg.max_steps):
                self.metrics.log(self.step, row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", HT=f"{row['frac/HT']:.2f}", tok_s=f"{row['tokens_per_s']:.0f}")
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                self._log_eval(self.evaluate())
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                self.save()
        bar.close()
        summary["checkpoint"] = self.save()
        after = self.evaluate()
        self._log_eval(after)
        summary["accuracy_after"] = after and after["accuracy"]
        summary["examples"] = after and after["examples"]
        summary["step"] = self.step
        if self.metrics is not None:
            self.metrics.close()
        return summary
