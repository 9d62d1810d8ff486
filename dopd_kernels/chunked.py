"""The PyTorch path (``backend="torch"``): routed loss without any N x V tensor.

Pipeline (dopd-method.md, "Cost model"):
1. keep the valid tokens only (padding costs nothing);
2. statistics pass over the self and teacher projections (``chunked_stats``): log-sum-exp, target
   logit, top-K where a top-K route reads that source -- 2 GEMMs over all tokens;
3. routing (``routing.route_tokens``) on those per-token values;
4. loss/gradient pass (``chunked_losses``): full-vocabulary work only for rows on full/sampled
   routes (plus every row when a CE term is on), K gathered projection rows for top-K routes.
The gradients are computed in the forward (closed forms, fp32 or fp64 accumulation) and handed to
autograd through ``attach.attach_grads``, whose backward only scales them by grad_output.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from . import ext
from .attach import attach_grads
from .chunked_losses import GradBuffers, Projection, student_full_rows, topk_rows
from .chunked_stats import linear_stats
from .config import RouteConfig
from .transform import IDENTITY, LogitTransform
from .output import RoutedLossOutput
from .reduction import reduction_weights
from .routing import route_tokens

Tensor = torch.Tensor
#: Tokens per statistics chunk = this x config.chunk_size (see chunked_routed_loss).
STATS_CHUNK_FACTOR = 4


def chunked_routed_loss(
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
    """The routed loss on the PyTorch path. Arguments as ``routed_loss`` (already validated).

    Shapes: hidden (*, H), target_ids / valid (*), student_weight (V, Hs), teacher_weight (Vt, Ht).
    Memory: O(chunk_size x V + N x K + V x Hs) beyond the inputs.
    """
    if not (student_transform.is_identity and teacher_transform.is_identity and self_transform.is_identity):
        raise NotImplementedError("chunked_routed_loss: logit transforms (scale/softcap) are not implemented on this backend "
                                  "yet; use backend='reference'")
    shape = target_ids.shape
    vocab, hs = student_weight.shape
    cdtype = torch.float64 if torch.float64 in (student_hidden.dtype, student_weight.dtype) else torch.float32
    inv_tau = 1.0 / config.temperature
    k = config.effective_top_k(vocab)

    flat_valid = valid.reshape(-1).to(torch.bool)
    rows = flat_valid.nonzero().squeeze(1)  # compress to valid tokens (one host sync on CUDA)
    every_row = rows.numel() == flat_valid.numel()

    def compress(x: Tensor) -> Tensor:
        """The valid rows of x (no copy when every row is valid)."""
        return x if every_row else x.index_select(0, rows)

    h_s = compress(student_hidden.reshape(-1, hs).detach())
    h_p = compress(self_hidden.reshape(-1, hs).detach())
    h_t = compress(teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach())
    y = compress(target_ids.reshape(-1))
    hard = None if hard_labels is None else compress(hard_labels.reshape(-1))
    red_w = compress(reduction_weights(valid.reshape(shape), config.reduction, cdtype).reshape(-1))

    def projection(weight: Tensor, bias: Optional[Tensor]) -> Projection:
        return Projection(
            weight.detach()[:vocab].to(cdtype),
            None if bias is None else bias.detach()[:vocab].to(cdtype),
        )

    student = projection(student_weight, student_bias)
    self_proj = student if self_weight is None else projection(self_weight, self_bias)
    teacher = projection(teacher_weight, teacher_bias)
    topk_sources = config.topk_sources()
    # The statistics pass holds one C x V buffer where the loss pass holds ~5: same peak at 4x the
    # tokens, and larger GEMMs run closer to the BLAS peak.
    stats_chunk = STATS_CHUNK_FACTOR * config.chunk_size
    want = torch.is_grad_enabled()  # read before entering no_grad
    # The compiled epilogues (chunked_ext.py) are wired for identity transforms only: their ops take a transform
    # (softcap / logit_scale arguments), but until the calls pass it, a transform keeps the torch code.
    identity = student_transform.is_identity and teacher_transform.is_identity and self_transform.is_identity
    torch_code_only = contextlib.nullcontext() if identity else ext.forced(False)

    with torch.no_grad(), torch_code_only:
        stats = {
            "self": linear_stats(h_p, self_proj.weight, self_proj.bias, y, inv_tau=inv_tau,
                                 top_k=k if "self" in topk_sources else 0, chunk_size=stats_chunk),
            "teacher": linear_stats(h_t, teacher.weight, teacher.bias, y, inv_tau=inv_tau,
                                    top_k=k if "teacher" in topk_sources else 0, chunk_size=stats_chunk),
        }
        source_logprob = {name: s.target_logprob for name, s in stats.items()}
        routing = route_tokens(source_logprob["self"], source_logprob["teacher"],
                               torch.ones_like(y, dtype=torch.bool), config)
        route = routing.route
        # Sorting rows by route makes most chunks single-route: groups are then whole chunks, no copies.
        order = torch.argsort(route, stable=True)

        grads = GradBuffers(
            hidden=torch.zeros_like(h_s, dtype=cdtype) if want and student_hidden.requires_grad else None,
            weight=torch.zeros(vocab, hs, dtype=cdtype, device=h_s.device)
            if want and student_weight.requires_grad else None,
            bias=torch.zeros(vocab, dtype=cdtype, device=h_s.device)
            if want and student_bias is not None and student_bias.requires_grad else None,
        )
        per_token = torch.zeros(rows.numel(), dtype=cdtype, device=h_s.device)
        student_logprob = torch.full_like(per_token, float("nan"))

        full_ids = [rid for rid, spec in enumerate(config.routes) if spec.support in ("full", "sampled")]
        needs_full = torch.ones_like(route, dtype=torch.bool) if config.ce_weight > 0 else torch.isin(
            route, torch.tensor(full_ids, dtype=route.dtype, device=route.device))
        full_rows = order[needs_full.index_select(0, order)]
        student_full_rows(
            full_rows, route=route, targets=y, hard_labels=hard, student_hidden=h_s, student=student,
            sources={"self": (h_p, self_proj), "teacher": (h_t, teacher)}, source_logprob=source_logprob,
            red_w=red_w, config=config, per_token=per_token, student_logprob=student_logprob, grads=grads,
        )
        for source in sorted(topk_sources):
            ids = [rid for rid, spec in enumerate(config.routes) if spec.support == "topk" and spec.source == source]
            in_source = torch.isin(route, torch.tensor(ids, dtype=route.dtype, device=route.device))
            topk_rows(
                order[in_source.index_select(0, order)], source, route=route, student_hidden=h_s,
                student=student, stats=stats[source], red_w=red_w, config=config, per_token=per_token,
                grads=grads,
            )
        loss_value = (per_token * red_w).sum()

    def scatter(values: Tensor, dtype: torch.dtype) -> Tensor:
        out = torch.zeros(flat_valid.numel(), dtype=dtype, device=values.device)
        return out.index_copy_(0, rows, values.to(dtype)).reshape(shape)

    d_hidden = None
    if grads.hidden is not None:
        d_hidden = grads.hidden if every_row else torch.zeros(
            flat_valid.numel(), hs, dtype=cdtype, device=h_s.device).index_copy_(0, rows, grads.hidden)
        d_hidden = d_hidden.reshape(student_hidden.shape)
    loss = attach_grads(
        loss_value.to(student_hidden.dtype if student_hidden.dtype == torch.float64 else torch.float32),
        None if d_hidden is None else d_hidden.to(student_hidden.dtype),
        None if grads.weight is None else grads.weight.to(student_weight.dtype),
        None if grads.bias is None else grads.bias.to(student_bias.dtype),
        student_hidden, student_weight, student_bias,
    )

    missing = torch.isnan(student_logprob)

    def lazy_logprob() -> Tensor:
        """Student log-probs of the rows the loss pass did not need the full softmax for."""
        with torch.no_grad():
            todo = missing.nonzero().squeeze(1)
            fresh = linear_stats(h_s.index_select(0, todo), student.weight, student.bias, y.index_select(0, todo),
                                 inv_tau=inv_tau, top_k=0, chunk_size=stats_chunk)
            student_logprob.index_copy_(0, todo, fresh.target_logprob)
            return scatter(student_logprob, cdtype)

    return RoutedLossOutput(
        loss=loss,
        per_token_loss=scatter(per_token, cdtype),
        route=torch.full(shape, -1, dtype=torch.int64, device=route.device).reshape(-1).index_copy_(0, rows, route).reshape(shape),
        adv_gap=scatter(routing.adv_gap, cdtype),
        q_self=scatter(routing.q_self, cdtype),
        q_teacher=scatter(routing.q_teacher, cdtype),
        student_logprob=lazy_logprob,
        thresholds=routing.thresholds,
        watched=[t for t in (student_hidden, student_weight, student_bias) if t is not None],
    )

