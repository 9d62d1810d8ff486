"""The ground truth: the DOPD routed loss on full logits, readable, in float64.

Materializes the three N x V logit tensors, so it is only for tests, small problems and code that
already has logits. Gradients come from autograd (the fused paths use closed forms, so the tests
compare two independent derivations). Follows dopd-method.md line by line.
"""

from __future__ import annotations

from typing import Optional

import torch

from .config import RouteConfig
from .divergences import divergence, sampled_pg
from .output import RoutedLossOutput
from .routing import route_tokens
from .topk import topk_lower_id
from .transform import IDENTITY, LogitTransform

Tensor = torch.Tensor


def reference_routed_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    self_hidden: Tensor,
    target_ids: Tensor,
    valid: Tensor,
    *,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    self_weight: Optional[Tensor] = None,
    self_bias: Optional[Tensor] = None,
    hard_labels: Optional[Tensor] = None,
    config: RouteConfig,
    student_transform: LogitTransform = IDENTITY,
    teacher_transform: LogitTransform = IDENTITY,
    self_transform: LogitTransform = IDENTITY,
) -> RoutedLossOutput:
    """Full-logits routed loss from hidden states and output projections (float64 throughout).

    Shapes: hidden (*, H), weight (V, H) (teacher (Vt, H), rows >= V ignored), target_ids/valid (*).
    The self pass uses ``student_weight`` detached unless ``self_weight`` is given. Each model's
    ``*_transform`` post-processes its logits (autograd differentiates through it).
    """
    vocab = student_weight.shape[0]
    if self_weight is None:
        self_weight, self_bias = student_weight.detach(), None if student_bias is None else student_bias.detach()

    def logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], transform: LogitTransform) -> Tensor:
        z = hidden.to(torch.float64) @ weight[:vocab].to(torch.float64).T
        return transform.apply(z if bias is None else z + bias[:vocab].to(torch.float64))

    with torch.no_grad():
        teacher_logits = logits(teacher_hidden, teacher_weight, teacher_bias, teacher_transform)
        self_logits = logits(self_hidden, self_weight, self_bias, self_transform)
    student_logits = logits(student_hidden, student_weight, student_bias, student_transform)
    return reference_from_logits(
        student_logits, teacher_logits, self_logits, target_ids, valid, hard_labels=hard_labels, config=config
    )


def reference_from_logits(
    student_logits: Tensor,
    teacher_logits: Tensor,
    self_logits: Tensor,
    target_ids: Tensor,
    valid: Tensor,
    *,
    hard_labels: Optional[Tensor] = None,
    config: RouteConfig,
    dtype: torch.dtype = torch.float64,
) -> RoutedLossOutput:
    """The routed loss on logits (*, V); teacher logits (*, Vt >= V) are cut to V. Computed in ``dtype``."""
    shape = target_ids.shape
    vocab = student_logits.shape[-1]
    tau = config.temperature
    valid = valid.reshape(-1).to(torch.bool)
    z_s = student_logits.reshape(-1, vocab).to(dtype) / tau
    z_p = self_logits.reshape(-1, vocab).detach().to(dtype) / tau
    z_t = teacher_logits.reshape(-1, teacher_logits.shape[-1])[:, :vocab].detach().to(dtype) / tau
    # Masked positions may hold any id (-100, padding): point them at token 0, their loss is dropped.
    y = torch.where(valid, target_ids.reshape(-1), 0).unsqueeze(-1)

    logp_s, logp_p, logp_t = z_s.log_softmax(-1), z_p.log_softmax(-1), z_t.log_softmax(-1)
    l_student = logp_s.gather(-1, y).squeeze(-1)
    l_self = logp_p.gather(-1, y).squeeze(-1)
    l_teacher = logp_t.gather(-1, y).squeeze(-1)

    routing = route_tokens(l_self, l_teacher, valid, config)
    k = config.effective_top_k(vocab)

    per_token = torch.zeros_like(l_student)
    for rid, spec in enumerate(config.routes):
        z_src, logp_src, l_src = (z_t, logp_t, l_teacher) if spec.source == "teacher" else (z_p, logp_p, l_self)
        if spec.support == "full":
            d = divergence(logp_s, logp_src, spec.divergence, config.jsd_beta)
        elif spec.support == "topk":
            idx = topk_lower_id(z_src, k)[1]  # the SOURCE's top-K; ties (saturated soft-caps) to the lower id
            d = divergence(
                z_s.gather(-1, idx).log_softmax(-1),
                z_src.gather(-1, idx).log_softmax(-1),
                spec.divergence,
                config.jsd_beta,
            )
        else:  # "sampled"
            d = sampled_pg(l_student, l_src)
        per_token = per_token + torch.where(routing.route == rid, config.route_weight(rid) * d, 0.0)

    if config.ce_weight > 0:
        if hard_labels is None:
            raise ValueError("hard_labels: required when config.ce_weight > 0")
        h = torch.where(valid, hard_labels.reshape(-1), 0).unsqueeze(-1)
        per_token = per_token - config.ce_weight * logp_s.gather(-1, h).squeeze(-1)
    per_token = torch.where(valid, per_token, 0.0)

    loss = _reduce(per_token.reshape(shape), valid.reshape(shape), config.reduction)
    zero = torch.zeros_like(l_student)
    return RoutedLossOutput(
        loss=loss,
        per_token_loss=per_token.detach().reshape(shape),
        route=routing.route.reshape(shape),
        adv_gap=routing.adv_gap.reshape(shape),
        q_self=routing.q_self.reshape(shape),
        q_teacher=routing.q_teacher.reshape(shape),
        student_logprob=torch.where(valid, l_student.detach(), zero).reshape(shape),
        thresholds=routing.thresholds,
    )


def _reduce(per_token: Tensor, valid: Tensor, reduction: str) -> Tensor:
    """The reduction of dopd-method.md, written out directly (1-D inputs are one sequence)."""
    if reduction == "sum":
        return per_token.sum()
    if reduction == "token_mean":
        return per_token.sum() / valid.sum().clamp_min(1)
    rows, vrows = (per_token, valid) if per_token.dim() == 2 else (per_token[None], valid[None])
    counts = vrows.sum(-1)
    seq_losses = rows.sum(-1) / counts.clamp_min(1)
    has_tokens = counts > 0
    return torch.where(has_tokens, seq_losses, 0.0).sum() / has_tokens.sum().clamp_min(1)
