"""The PyTorch path (``backend="torch"``): routed loss without any N x V tensor.

Pipeline (dopd-method.md, "Cost model"):
1. keep the valid tokens only (padding costs nothing);
2. statistics pass over the self and teacher projections (``chunked_stats``): log-sum-exp, target
   logit, top-K where a top-K route reads that source -- 2 GEMMs over all tokens;
   each model's ``LogitTransform`` rides with its projection and is applied wherever its chunk logits
   are formed (``LogitTransform.apply_``) and chained wherever a logit gradient is folded
   (``LogitTransform.chain_grad_``);
3. routing (``routing.route_tokens``) on those per-token values;
4. loss/gradient pass (``chunked_losses``): full-vocabulary work only for rows on full/sampled
   routes (plus every row when a CE term is on), K gathered projection rows for top-K routes.
The gradients are computed in the forward (closed forms, fp32 or fp64 accumulation) and handed to
autograd through ``attach.attach_grads``, whose backward only scales them by grad_output.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from .chunked_losses import GradBuffers, Projection, student_full_rows, topk_rows
from .chunked_stats import linear_stats
from .config import RouteConfig
from .transform import IDENTITY, LogitTransform
from .output import RoutedLossOutput, keep_valid_rows, output_from_kept_rows
from .routing import route_tokens
from .topk import ties_may_cross_cut

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
    shape = target_ids.shape
    vocab, hs = student_weight.shape
    cdtype = torch.float64 if torch.float64 in (student_hidden.dtype, student_weight.dtype) else torch.float32
    inv_tau = 1.0 / config.temperature
    k = config.effective_top_k(vocab)

    kept = keep_valid_rows(valid, student_hidden=student_hidden, self_hidden=self_hidden,
                           teacher_hidden=teacher_hidden, target_ids=target_ids, hard_labels=hard_labels,
                           config=config, dtype=cdtype)
    rows, h_s, h_p, h_t = kept.rows, kept.student_hidden, kept.self_hidden, kept.teacher_hidden
    y, hard, red_w = kept.targets, kept.hard_labels, kept.red_w

    def projection(weight: Tensor, bias: Optional[Tensor], transform: LogitTransform) -> Projection:
        # The weight stays as stored: a bf16 head is converted per vocabulary block inside the GEMMs
        # (chunked_stats.vocab_blocks), never copied whole to fp32 (that would be V x H extra per model).
        return Projection(weight.detach()[:vocab], None if bias is None else bias.detach()[:vocab].to(cdtype),
                          transform, cdtype)

    student = projection(student_weight, student_bias, student_transform)
    # The self pass shares the student's weights but may have its own transform (no copy either way).
    self_proj = (replace(student, transform=self_transform) if self_weight is None
                 else projection(self_weight, self_bias, self_transform))
    teacher = projection(teacher_weight, teacher_bias, teacher_transform)
    topk_sources = config.topk_sources()
    # The statistics pass holds one C x V buffer where the loss pass holds ~5: same peak at 4x the
    # tokens, and larger GEMMs run closer to the BLAS peak.
    stats_chunk = STATS_CHUNK_FACTOR * config.chunk_size
    want = torch.is_grad_enabled()  # read before entering no_grad
    # Whether each source's top-K meets exact ties (soft-cap, -inf biases): decided for both at once, before
    # any GEMM is queued (one small host read on CUDA, only when a bias must be looked at).
    ties = ties_may_cross_cut([(p.bias, p.transform.softcap is not None, k if name in topk_sources else 0)
                               for name, p in (("self", self_proj), ("teacher", teacher))])

    with torch.no_grad():
        stats = {
            "self": linear_stats(h_p, self_proj.weight, self_proj.bias, y, inv_tau=inv_tau,
                                 top_k=k if "self" in topk_sources else 0, chunk_size=stats_chunk,
                                 transform=self_proj.transform, dtype=cdtype, exact_ties=ties[0]),
            "teacher": linear_stats(h_t, teacher.weight, teacher.bias, y, inv_tau=inv_tau,
                                    top_k=k if "teacher" in topk_sources else 0, chunk_size=stats_chunk,
                                    transform=teacher.transform, dtype=cdtype, exact_ties=ties[1]),
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

    def fill_logprob(todo: Tensor) -> Tensor:
        """Student log-probs of the rows the loss pass did not need the full softmax for."""
        return linear_stats(h_s.index_select(0, todo), student.weight, student.bias, y.index_select(0, todo),
                            inv_tau=inv_tau, top_k=0, chunk_size=stats_chunk, transform=student.transform,
                            dtype=cdtype).target_logprob

    return output_from_kept_rows(
        shape=shape, rows=rows, loss_value=loss_value, per_token=per_token, routing=routing,
        logprob=student_logprob, fill_logprob=fill_logprob, grads=grads, student_hidden=student_hidden,
        student_weight=student_weight, student_bias=student_bias,
    )
