"""The vocabulary-parallel routed loss: the stages in order (see ``__init__.py`` for the design).

1. keep the valid tokens only (as the single-process PyTorch path; one host sync on CUDA);
2. statistics of the self and teacher passes on the shard, exchanged (``stats.source_stats``);
3. routing (``routing.route_tokens``, shared; ``config.stats_group`` pools its statistics over the
   data-parallel ranks, independently of the vocabulary group);
4. losses and gradients (``losses.full_rows``, ``losses.topk_rows``);
5. d hidden summed over the vocabulary group (unless the caller's tensor-parallel region does it);
   gradients attached (``attach.attach_grads``) as on one process.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from ..chunked import STATS_CHUNK_FACTOR
from ..chunked_losses import GradBuffers
from ..config import RouteConfig
from ..devices import device_guard
from ..output import RoutedLossOutput, keep_valid_rows, output_from_kept_rows
from ..routing import route_tokens
from ..transform import IDENTITY, LogitTransform
from .comm import all_reduce_sum_
from .layout import ShardLayout
from .losses import full_rows, topk_rows
from .ops import TorchShardOps
from .stats import source_stats, student_logprob

Tensor = torch.Tensor


def _shard_ops(backend: str, dtype: torch.dtype, device: torch.device, config: RouteConfig, layout: ShardLayout):
    """The per-shard compute: Triton kernels for ``backend="triton"`` (float64 inputs go to torch, as on one
    process), else torch."""
    inv_tau = 1.0 / config.temperature
    if backend == "triton" and dtype != torch.float64:
        from .triton_ops import TritonShardOps

        return TritonShardOps(device, inv_tau)
    return TorchShardOps(dtype, inv_tau, STATS_CHUNK_FACTOR * config.chunk_size, config.chunk_size * layout.local)


def vocab_parallel_routed_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    self_hidden: Tensor,
    target_ids: Tensor,
    valid: Tensor,
    *,
    layout: ShardLayout,
    backend: str = "torch",
    reduce_hidden_grad: bool = True,
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
    """The routed loss with the weights sharded by vocabulary rows (arguments validated, ``backend`` "torch"
    or "triton"). Weights and biases are this rank's rows [layout.offset, + layout.local); everything else is
    replicated. Returns what ``chunked_routed_loss`` would on the whole weights, on every rank; the gradient
    of student_hidden is summed over the group when ``reduce_hidden_grad``, else this shard's part.
    Reading ``student_logprob`` may run a collective (see ``RoutedLossOutput``): read it on every rank.
    """
    shape = target_ids.shape
    hs = student_weight.shape[1]
    wide = torch.float64 in (student_hidden.dtype, student_weight.dtype)
    ops = _shard_ops(backend, torch.float64 if wide else torch.float32, student_hidden.device, config, layout)
    cdtype = ops.dtype
    k = config.effective_top_k(layout.vocab)

    kept = keep_valid_rows(valid, student_hidden=student_hidden, self_hidden=self_hidden,
                           teacher_hidden=teacher_hidden, target_ids=target_ids, hard_labels=hard_labels,
                           config=config, dtype=cdtype)
    rows, h_s, h_p, h_t = kept.rows, kept.student_hidden, kept.self_hidden, kept.teacher_hidden
    y, hard, red_w = kept.targets, kept.hard_labels, kept.red_w

    student = ops.projection(student_weight, student_bias, student_transform)
    self_proj = (replace(student, transform=self_transform) if self_weight is None
                 else ops.projection(self_weight, self_bias, self_transform))
    teacher = ops.projection(teacher_weight, teacher_bias, teacher_transform)
    models = {"self": (h_p, self_proj), "teacher": (h_t, teacher)}
    topk_sources = config.topk_sources()
    want = torch.is_grad_enabled()

    # Triton launches on the current CUDA device, which need not be the tensors' (as on one process)
    with device_guard(h_s.device), torch.no_grad():
        stats = source_stats(ops, models, y, layout, k, topk_sources)
        routing = route_tokens(stats["self"].whole.target_logprob, stats["teacher"].whole.target_logprob,
                               torch.ones_like(y, dtype=torch.bool), config)
        route = routing.route
        order = torch.argsort(route, stable=True)  # most chunks then hold one route

        grads = GradBuffers(
            hidden=torch.zeros(h_s.shape, dtype=cdtype, device=h_s.device)
            if want and student_hidden.requires_grad else None,
            weight=torch.zeros(layout.local, hs, dtype=cdtype, device=h_s.device)
            if want and student_weight.requires_grad else None,
            bias=torch.zeros(layout.local, dtype=cdtype, device=h_s.device)
            if want and student_bias is not None and student_bias.requires_grad else None,
        )
        per_token = torch.zeros(rows.numel(), dtype=cdtype, device=h_s.device)
        logprob = torch.full_like(per_token, float("nan"))

        full_ids = [rid for rid, spec in enumerate(config.routes) if spec.support in ("full", "sampled")]
        needs_full = torch.ones_like(route, dtype=torch.bool) if config.ce_weight > 0 else torch.isin(
            route, torch.tensor(full_ids, dtype=route.dtype, device=route.device))
        full_rows(order[needs_full.index_select(0, order)], ops=ops, layout=layout, route=route, targets=y,
                  hard_labels=hard, student_hidden=h_s, student=student, sources=models, stats=stats, red_w=red_w,
                  config=config, per_token=per_token, student_logprob=logprob, grads=grads)
        if topk_sources:
            topk_ids = [rid for rid, spec in enumerate(config.routes) if spec.support == "topk"]
            on_topk = torch.isin(route, torch.tensor(topk_ids, dtype=route.dtype, device=route.device))
            topk_rows(order[on_topk.index_select(0, order)], ops=ops, layout=layout, route=route, student_hidden=h_s,
                      student=student, stats=stats, top_k=k, block=config.chunk_size,
                      red_w=red_w, config=config, per_token=per_token, grads=grads)
        loss_value = (per_token * red_w).sum()
        if grads.hidden is not None and reduce_hidden_grad:
            all_reduce_sum_(grads.hidden, layout)  # every shard's part: the full gradient on every rank

    def fill_logprob(todo: Tensor) -> Tensor:
        """The student's log-probs of the rows the loss pass did not need the full softmax for (a collective)."""
        with device_guard(h_s.device):
            return student_logprob(ops, ops.hidden(h_s.index_select(0, todo)), student, y.index_select(0, todo),
                                   layout)

    return output_from_kept_rows(
        shape=shape, rows=rows, loss_value=loss_value, per_token=per_token, routing=routing, logprob=logprob,
        fill_logprob=fill_logprob, grads=grads, student_hidden=student_hidden, student_weight=student_weight,
        student_bias=student_bias,
    )
