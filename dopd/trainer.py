"""The step loop: rollouts -> three contexts -> three hidden-state passes -> routed loss -> AdamW.

One optimizer step takes ``grad_accum`` micro-batches of ``prompts_per_step`` prompts, each with
``num_generations`` sampled responses. The teacher is frozen; the self pass runs under no_grad with the
privileged context, on the live student or a frozen/EMA copy (``dopd.self_model``). Data order is a
function of (seed, micro-step) alone, and the RNG state is checkpointed, so ``--resume`` reproduces an uninterrupted run exactly.
Everything that can be checked without weights is checked first (``dopd.preflight``); dtypes follow
``dopd.precision`` (fp32 masters, autocast compute); logit post-processing follows ``passes.logit_transform``.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from typing import Any, Callable, Optional, Sequence

import torch

from dopd.checkpoint import latest_checkpoint, load_state, save_checkpoint, set_rng_state
from dopd.config import TrainConfig
from dopd.data import PromptTemplate, Record
from dopd.evaluate import evaluate
from dopd.metrics import MetricsLogger
from dopd.modeling import load_causal_lm, maybe_apply_liger
from dopd.passes import build_pass_batch, output_projection, response_hidden, verify_logit_transform
from dopd.precision import Precision
from dopd.preflight import check_run, route_config  # noqa: F401  (route_config: re-exported)
from dopd.rollout import generate
from dopd.self_model import make_self_model


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


def distill_loss(student: Any, teacher: Any, tokenizer: Any, template: PromptTemplate, records: Sequence[Record],
                 config: TrainConfig, loss_config: Any, self_model: Any = None, *,
                 precision: Optional[Precision] = None,
                 transforms: Optional[dict[str, Any]] = None) -> tuple[Any, dict[str, float]]:
    """One micro-batch: sample, run the three passes, return (RoutedLossOutput, rollout stats).

    ``self_model`` runs the privileged self pass (default: the live student). ``precision`` sets autocast
    for the rollouts and passes and the dtype the loss receives (None: no autocast, tensors as the models
    give them); ``transforms`` are routed_loss's ``student_transform`` / ``teacher_transform`` (the
    models' logit post-processing).
    """
    from dopd_kernels import routed_loss

    cast = (lambda t: t) if precision is None else precision.loss_input
    precision = precision or Precision()  # float32: autocast is a no-op
    device = next(student.parameters()).device
    group = [r for r in records for _ in range(config.num_generations)]
    student_ctx = template.encode(tokenizer, group, privileged=False)
    privileged_ctx = template.encode(tokenizer, group, privileged=True)
    t0 = time.perf_counter()
    with precision.autocast(device):
        roll = generate(student, tokenizer, student_ctx, max_new_tokens=config.max_new_tokens, do_sample=True,
                        temperature=config.temperature, top_p=config.top_p)
    t_gen = time.perf_counter() - t0
    pad = tokenizer.pad_token_id
    s_batch = build_pass_batch(student_ctx, roll.tokens, roll.mask, pad).to(device)
    p_batch = build_pass_batch(privileged_ctx, roll.tokens, roll.mask, pad).to(device)
    with precision.autocast(device):
        s_hidden = response_hidden(student, s_batch)
        with torch.no_grad():  # self: privileged context, stop-gradient (live student weights by default)
            self_hidden = response_hidden(self_model if self_model is not None else student, p_batch)
            teacher_hidden = response_hidden(teacher, p_batch)
    # The loss gets everything in the compute dtype (a differentiable cast of the student's fp32 masters)
    # and runs outside autocast: it accumulates in fp32 itself, autocast would redo its GEMMs in bf16.
    s_weight, s_bias = output_projection(student)
    t_weight, t_bias = output_projection(teacher)
    self_proj = {}
    if self_model is not None:
        p_weight, p_bias = output_projection(self_model)
        self_proj = {"self_weight": cast(p_weight), "self_bias": cast(p_bias)}
    out = routed_loss(cast(s_hidden), cast(s_weight), cast(teacher_hidden), cast(t_weight), cast(self_hidden),
                      roll.tokens.to(device), roll.mask.to(device), student_bias=cast(s_bias),
                      teacher_bias=cast(t_bias), config=loss_config, backend=config.loss_backend, **self_proj,
                      **(transforms or {}))
    stats = {"response_len": roll.lengths.float().mean().item(), "n_tokens": float(roll.mask.sum()),
             "time/generate": t_gen}
    return out, stats


class Trainer:
    """Runs ``config`` end to end: setup (checks first, then models), train, checkpoints, evaluation."""

    def __init__(self, config: TrainConfig, log: Callable[[str], None] = print) -> None:
        self.config = config.validate()
        self.log = log
        self.template = template_from(config)

    # ----------------------------------------------------------------- setup
    def setup(self) -> None:
        """Check everything that needs no weights (``dopd.preflight``), then load models, optimizer and
        schedule; resume. Nothing is written to the output directory before the models loaded."""
        cfg = self.config
        plan = check_run(cfg)  # data, loss options, device, model configs, logit transforms, tokenizers
        self.records, self.eval_records, self.tokenizer = plan.records, plan.eval_records, plan.tokenizer
        self.loss_config, self.device, self.precision = plan.loss_config, plan.device, plan.precision
        self.transforms = plan.transforms
        self.resume_from = latest_checkpoint(cfg.output_dir) if cfg.resume else None
        if cfg.resume and self.resume_from is None:
            self.log(f"--resume: no checkpoint in {cfg.output_dir}; starting from step 0")
        student_path = self.resume_from or cfg.student
        # Models: the student in fp32 (the masters), frozen models in the compute dtype (dopd.precision).
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        prec = self.precision
        self.student = load_causal_lm(student_path, prec.param_dtype, self.device, trainable=True)
        self.teacher = load_causal_lm(cfg.teacher, prec.frozen_dtype, self.device, trainable=False)
        # A frozen self is the *initial* student (cfg.student, also after --resume), never trained; an
        # EMA self starts as the student (in the masters' dtype) and follows it after every optimizer step.
        self.self_model, self.self_ema = make_self_model(
            cfg.self_model, cfg.self_ema_decay, self.student,
            lambda: load_causal_lm(cfg.student, prec.frozen_dtype, self.device, trainable=False))
        # The configs promised these logits; check on a few tokens that the loaded classes agree.
        verify_logit_transform(self.student, self.transforms["student_transform"], f"--student {cfg.student}")
        verify_logit_transform(self.teacher, self.transforms["teacher_transform"], f"--teacher {cfg.teacher}")
        for m in (self.student, self.teacher):
            if maybe_apply_liger(m, self.device, cfg.use_liger):
                self.log(f"Liger-Kernel patches applied to {type(m).__name__}")
        from transformers import get_cosine_schedule_with_warmup

        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=cfg.learning_rate,
                                           betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)
        self.scheduler = get_cosine_schedule_with_warmup(
            self.optimizer, num_warmup_steps=int(cfg.warmup_ratio * cfg.max_steps), num_training_steps=cfg.max_steps)
        self.scaler = prec.grad_scaler(self.device)
        self.step = 0
        if self.resume_from:
            state = load_state(self.resume_from)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.step = int(state["step"])
            if self.self_ema is not None:
                self.self_ema.load_state_dict(state["self_ema"])
            set_rng_state(state["rng"])  # last: nothing after this may draw random numbers before step 1
            self.log(f"resumed from {self.resume_from} at step {self.step}")
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(os.path.join(cfg.output_dir, "config.json"), "w") as fh:
            json.dump(cfg.to_dict(), fh, indent=2)
        self.metrics = MetricsLogger(cfg.output_dir, cfg.report_to,
                                     resume_step=self.step if self.resume_from else None, run_config=cfg.to_dict())

    # ----------------------------------------------------------------- evaluation
    def evaluate(self) -> Optional[dict[str, Any]]:
        """Greedy accuracy of the student on ``eval_data`` (None without eval data)."""
        if not self.eval_records:
            return None
        recs = self.eval_records[: self.config.eval_limit or None]
        # Evaluation must not move the training RNG, or eval_every would change the training run.
        rng = torch.get_rng_state()
        with self.precision.autocast(self.device):
            result = evaluate(self.student, self.tokenizer, self.template, recs,
                              max_new_tokens=self.config.max_new_tokens, batch_size=self.config.eval_batch_size,
                              marker=self.config.answer_marker)
        torch.set_rng_state(rng)
        return result

    def _log_eval(self, result: Optional[dict[str, Any]]) -> None:
        if result is not None:
            self.metrics.log(self.step, {"eval/accuracy": result["accuracy"], "eval/n": result["n"]})
            self.log(f"step {self.step}: eval accuracy {result['accuracy']:.3f} on {result['n']} prompts")

    # ----------------------------------------------------------------- training
    def micro_batch(self, records: Sequence[Record]) -> tuple[Any, dict[str, float]]:
        """The loss of one micro-batch of ``records`` with this run's models, precision and logit transforms."""
        return distill_loss(self.student, self.teacher, self.tokenizer, self.template, records, self.config,
                            self.loss_config, self.self_model, precision=self.precision, transforms=self.transforms)

    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns its metrics."""
        cfg = self.config
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        rows: list[dict[str, float]] = []
        for k in range(cfg.grad_accum):
            idx = batch_indices(self.step * cfg.grad_accum + k, len(self.records), cfg.prompts_per_step, cfg.seed)
            out, stats = self.micro_batch([self.records[i] for i in idx])
            self.scaler.scale(out.loss / cfg.grad_accum).backward()  # fp16: scaled; otherwise unchanged
            # Read everything from `out` now: its lazy student log-prob must see the pre-step weights.
            m = out.metrics(include_logprob=True)
            m["student_entropy"] = -m.pop("student_logprob_mean")  # sampled-token estimate of the entropy
            rows.append({**m, **stats})
        bad = [r["loss"] for r in rows if not math.isfinite(r["loss"])]
        if bad:  # before the step: the weights stay as they were
            raise FloatingPointError(f"non-finite loss at step {self.step + 1}: {bad[0]}")
        self.scaler.unscale_(self.optimizer)  # clip the true gradients (a no-op without fp16)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.max_grad_norm or float("inf"))
        lr = self.scheduler.get_last_lr()[0]
        self.scaler.step(self.optimizer)  # fp16: skipped when the scaled gradients overflowed
        self.scaler.update()
        self.scheduler.step()
        if self.self_ema is not None:
            self.self_ema.update(self.student)
        self.step += 1
        merged = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
        merged["n_tokens"] = sum(r["n_tokens"] for r in rows)
        elapsed = time.perf_counter() - t0
        merged.update({"lr": lr, "grad_norm": float(grad_norm), "time/step": elapsed,
                       "tokens_per_s": merged["n_tokens"] / elapsed})
        return merged

    def save(self) -> str:
        """Checkpoint the current step."""
        return save_checkpoint(self.config.output_dir, self.step, self.student, self.tokenizer, self.optimizer,
                               self.scheduler, keep=self.config.keep_checkpoints,
                               extra={"config": self.config.to_dict(), "scaler": self.scaler.state_dict(),
                                      **({"self_ema": self.self_ema.state_dict()} if self.self_ema is not None else {})})

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
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not cfg.progress, desc=f"dopd[{cfg.preset}]")
        while self.step < cfg.max_steps:
            row = self.train_step()
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
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
        self.metrics.close()
        return summary
