"""Loss/gradient pass of the PyTorch path: per-route losses and their gradients, chunk by chunk.

Two kinds of rows, after routing:
- "student-full" rows (full or sampled support, or every row when a CE term is on): the student's
  C x V logits are recomputed per chunk (and the source's, for full support); the gradient with respect
  to the logits comes from the closed forms of ``divergences.divergence_and_grad``, goes back through
  the student's ``LogitTransform`` and is folded into d hidden (C x V @ V x H) and d weight
  (V x C @ C x H) immediately.
- top-K rows: only the K output-projection rows picked by the source's top-K are gathered
  (C x K x H), so these tokens cost O(K H) instead of O(V H).
Gradients are accumulated into caller-provided buffers scaled by the per-token reduction weights,
so the backward of the autograd Function is a multiplication by grad_output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import chunked_ext
from .config import RouteConfig
from .divergences import divergence_and_grad
from .chunked_stats import LinearStats, logits_grad_to_hidden, scaled_logits
from .transform import IDENTITY, LogitTransform

Tensor = torch.Tensor


@dataclass
class Projection:
    """One model's output projection: weight (V, H) as stored (bf16 stays bf16: the GEMMs convert it per
    vocabulary block), bias (V,) or None in the compute ``dtype`` (default: the weight's), and the
    post-processing of its logits (applied wherever this projection's logits are formed)."""

    weight: Tensor
    bias: Optional[Tensor]
    transform: LogitTransform = IDENTITY
    dtype: Optional[torch.dtype] = None

    def __post_init__(self) -> None:
        if self.dtype is None:
            self.dtype = self.weight.dtype


@dataclass
class GradBuffers:
    """Accumulators (compute dtype): hidden (n, Hs) or None, weight (V, Hs) or None, bias (V,) or None."""

    hidden: Optional[Tensor]
    weight: Optional[Tensor]
    bias: Optional[Tensor]

    @property
    def any(self) -> bool:
        """Whether any gradient is requested."""
        return self.hidden is not None or self.weight is not None or self.bias is not None


def _groups(route_rows: Tensor, route_ids: list[int]) -> list[tuple[int, Tensor]]:
    """(route id, positions within the chunk) for each route present; rows are pre-sorted by route."""
    out = []
    for rid in route_ids:
        pos = (route_rows == rid).nonzero().squeeze(1)
        if pos.numel():
            out.append((rid, pos))
    return out


def _take(x: Tensor, pos: Tensor) -> Tensor:
    """x[pos] without a copy when ``pos`` is every row."""
    return x if pos.numel() == x.shape[0] else x.index_select(0, pos)


def student_full_rows(
    rows: Tensor,
    *,
    route: Tensor,
    targets: Tensor,
    hard_labels: Optional[Tensor],
    student_hidden: Tensor,
    student: Projection,
    sources: dict[str, tuple[Tensor, Projection]],
    source_logprob: dict[str, Tensor],
    red_w: Tensor,
    config: RouteConfig,
    per_token: Tensor,
    student_logprob: Tensor,
    grads: GradBuffers,
) -> None:
    """Losses (into ``per_token``), student log-probs and gradients for rows needing the full softmax.

    rows: (R,) indices into the compressed token arrays, sorted by route. sources[name] =
    (hidden (n, H_src), projection). source_logprob[name]: (n,) log-prob of the target under it.
    """
    inv_tau = 1.0 / config.temperature
    rids = [rid for rid, spec in enumerate(config.routes) if spec.support in ("full", "sampled")]
    for chunk in rows.split(chunked_ext.full_chunk_rows(config, student)):
        h = student_hidden.index_select(0, chunk).to(student.dtype)
        z = scaled_logits(h, student.weight, student.bias, inv_tau, student.transform, student.dtype)
        fused = chunked_ext.full_chunk(z, chunk, route=route, targets=targets, student=student, sources=sources,
                                       red_w=red_w, config=config, student_logprob=student_logprob,
                                       want_grad=grads.any)
        if fused is not None:  # the compiled epilogue did the chunk; z now holds its raw logit gradient
            per_token.index_add_(0, chunk, fused)
            if grads.any:
                _fold_full_grad(z, h, chunk, student, grads)
            del z  # before the next chunk's GEMM
            continue
        logp = z.log_softmax(-1)
        # Kept (one more C x V buffer) only when the transform's derivative reads it: a soft-cap.
        z = z if student.transform.grad_needs_logits else None
        y = targets.index_select(0, chunk)[:, None]
        student_logprob.index_copy_(0, chunk, logp.gather(1, y).squeeze(1))
        loss = torch.zeros(chunk.numel(), dtype=logp.dtype, device=logp.device)
        dz = torch.zeros_like(logp) if grads.any else None
        for rid, pos in _groups(route.index_select(0, chunk), rids):
            spec, weight = config.routes[rid], config.route_weight(rid)
            rows_g = _take(chunk, pos)
            logp_g = _take(logp, pos)
            if spec.support == "full":
                src_hidden, src = sources[spec.source]
                h_src = src_hidden.index_select(0, rows_g).to(src.dtype)
                logp_src = scaled_logits(h_src, src.weight, src.bias, inv_tau, src.transform, src.dtype).log_softmax(-1)
                value, g = divergence_and_grad(logp_g, logp_src, spec.divergence, config.jsd_beta)
            else:  # sampled: (l_S - l_src).detach() * l_S, gradient c * (onehot - s)
                y_g = _take(y, pos)
                l_s = logp_g.gather(1, y_g).squeeze(1)
                c = l_s - source_logprob[spec.source].index_select(0, rows_g)
                value = c * l_s
                g = logp_g.exp().mul_(-c[:, None]).scatter_add_(1, y_g, c[:, None]) if dz is not None else None
            loss.index_add_(0, pos, weight * value)
            if dz is not None:
                dz.index_add_(0, pos, g.mul_(weight)) if pos.numel() != dz.shape[0] else dz.add_(g, alpha=weight)
        if config.ce_weight > 0:
            yh = hard_labels.index_select(0, chunk)[:, None]
            loss.sub_(config.ce_weight * logp.gather(1, yh).squeeze(1))
            if dz is not None:  # d(-log s_y)/dz = s - onehot(y)
                dz.add_(logp.exp().scatter_add_(1, yh, -torch.ones_like(yh, dtype=logp.dtype)), alpha=config.ce_weight)
        per_token.index_add_(0, chunk, loss)
        if dz is not None:
            student.transform.chain_grad_(dz, z, inv_tau, red_w.index_select(0, chunk))
            _fold_full_grad(dz, h, chunk, student, grads)


def _fold_full_grad(dz: Tensor, h: Tensor, chunk: Tensor, student: Projection, grads: GradBuffers) -> None:
    """d hidden[chunk] += dz @ W;  d W += dz^T @ h;  d b += sum(dz). dz: (C, V) raw logit gradient."""
    if grads.hidden is not None:  # chunk rows are distinct; index_put_ adds them ~10x faster than index_add_ on CPU
        grads.hidden.index_put_((chunk,), logits_grad_to_hidden(dz, student.weight), accumulate=True)
    if grads.weight is not None:
        grads.weight.addmm_(dz.T, h)
    if grads.bias is not None:
        grads.bias.add_(dz.sum(0))


def gathered_logprobs(h: Tensor, idx: Tensor, student: Projection,
                      inv_tau: float) -> tuple[Tensor, Tensor, Tensor]:
    """The student's log-probs renormalized over K ids per row, the gathered projection rows, and the
    gathered logits ``transform(z) * inv_tau`` (for the transform's gradient).

    h (C, H), idx (C, K) -> logp (C, K), w_rows (C, K, H), logits (C, K), all in h's dtype.
    """
    # embedding's gather is faster than advanced indexing on CPU
    w_rows = torch.nn.functional.embedding(idx, student.weight).to(h.dtype)
    z = torch.bmm(w_rows, h[:, :, None]).squeeze(2)
    b_rows = None
    if student.bias is not None:
        b_rows = student.bias.index_select(0, idx.reshape(-1)).view_as(z).to(h.dtype)
        z = z + b_rows
    z = student.transform.apply_(z, inv_tau, b_rows)
    return z.log_softmax(-1), w_rows, z


def fold_topk_grad(dz: Tensor, h: Tensor, w_rows: Tensor, idx: Tensor, weight_grad: Optional[Tensor],
                   bias_grad: Optional[Tensor]) -> Tensor:
    """Fold a (C, K) logit gradient into d weight / d bias (in place) and return d hidden (C, H).

    dz must already carry the route weights, reduction weights, 1/tau and the transform's derivative.
    """
    flat_idx = idx.reshape(-1)
    if weight_grad is not None:
        weight_grad.index_add_(0, flat_idx, (dz[:, :, None] * h[:, None, :]).reshape(-1, h.shape[1]))
    if bias_grad is not None:
        bias_grad.index_add_(0, flat_idx, dz.reshape(-1))
    return torch.bmm(dz[:, None, :], w_rows).squeeze(1)


def topk_divergences(logp: Tensor, logp_src: Tensor, route_rows: Tensor, rids: list[int], config: RouteConfig,
                     want_grad: bool) -> tuple[Tensor, Optional[Tensor]]:
    """Per-row weighted divergences (C,) between the student's and the source's log-probs over the K ids
    (both (C, K)), each row by its route's divergence (route ids ``rids``), and their gradient with respect
    to the student's K logits (C, K) (None unless ``want_grad``)."""
    loss = torch.zeros(logp.shape[0], dtype=logp.dtype, device=logp.device)
    dz = torch.zeros_like(logp) if want_grad else None
    for rid, pos in _groups(route_rows, rids):
        spec, weight = config.routes[rid], config.route_weight(rid)
        value, g = divergence_and_grad(_take(logp, pos), _take(logp_src, pos), spec.divergence, config.jsd_beta)
        loss.index_add_(0, pos, weight * value)
        if dz is not None:
            dz.index_add_(0, pos, g.mul_(weight))
    return loss, dz


def topk_rows(
    rows: Tensor,
    source: str,
    *,
    route: Tensor,
    student_hidden: Tensor,
    student: Projection,
    stats: LinearStats,
    red_w: Tensor,
    config: RouteConfig,
    per_token: Tensor,
    grads: GradBuffers,
) -> None:
    """Losses and gradients of the rows on top-K routes of one source (rows sorted by route).

    The source's top-K (indices and transformed, scaled logits) come from the statistics pass; the
    student's logits at those K ids are ``transform(h . W[idx] (+ b[idx]))``: a gather of K rows of W
    per token.
    """
    if chunked_ext.topk_rows(rows, route=route, student_hidden=student_hidden, student=student, stats=stats,
                             red_w=red_w, config=config, per_token=per_token, grads=grads):
        return  # the compiled epilogue (dopd_kernels.ext)
    inv_tau = 1.0 / config.temperature
    k = stats.topk_idx.shape[1]
    hs = student.weight.shape[1]
    # Same memory as a C x V chunk: C x K x H gathered rows.
    chunk_rows = max(1, (config.chunk_size * student.weight.shape[0]) // max(1, k * hs))
    rids = [rid for rid, spec in enumerate(config.routes) if spec.support == "topk" and spec.source == source]
    for chunk in rows.split(chunk_rows):
        h = student_hidden.index_select(0, chunk).to(student.dtype)
        idx = stats.topk_idx.index_select(0, chunk)
        logp, w_rows, z = gathered_logprobs(h, idx, student, inv_tau)
        logp_src = stats.topk_vals.index_select(0, chunk).log_softmax(-1)
        loss, dz = topk_divergences(logp, logp_src, route.index_select(0, chunk), rids, config, grads.any)
        per_token.index_add_(0, chunk, loss)
        if dz is None:
            continue
        student.transform.chain_grad_(dz, z, inv_tau, red_w.index_select(0, chunk))
        d_hidden = fold_topk_grad(dz, h, w_rows, idx, grads.weight, grads.bias)
        if grads.hidden is not None:
            grads.hidden.index_add_(0, chunk, d_hidden)
