"""Stage 3 of the vocabulary-parallel loss: per-route losses and gradients, each rank on its own rows.

Full-support / sampled rows (and every row when a CE term is on), per chunk of C tokens:
    the student's C x V_r logits on the shard; one all-gather of (shard log-sum-exp, logit at the sampled
    token, logit at the hard label; the owner's, 0 elsewhere) gives the log-softmax over the whole
    vocabulary; the source's log-probs come from its shard logits and its global log-sum-exp (stage 1);
    ``divergences.divergence_and_grad`` with ``reduce_rows`` all-reduces the per-row sums (1 value per row,
    2 for JSD) that the value and the closed-form gradient need; every per-logit term stays local, and
    the gradient folds into the shard's d W / d b rows and this shard's part of d hidden.
Top-K rows, per block of tokens:
    each row's source top-K is merged from the shards' candidates (``comm.merge_topk``, one all-gather of
    2 K_r values per rank and row); the student's raw logits at the K winning ids are computed by their
    owners (0 elsewhere) and all-reduced (K values per row); the renormalized divergence and its gradient
    are computed on every rank (replicated, O(K) per row); the gradient folds into the rows this rank owns.
    Each rank computes and folds only the (row, k) pairs whose id it owns (about 1 / ranks of them): the
    Triton kernels skip the others (ids -1: no loads, no atomics), the torch ops compact them away.
Every rank computes the same per-token losses; d W / d b are the shard's rows of the full gradient and d
hidden is this shard's contribution (the caller sums it over the group, or leaves that to its own
tensor-parallel region).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..chunked_losses import GradBuffers, Projection, _groups, _take, topk_divergences
from ..config import RouteConfig
from ..divergences import divergence_and_grad
from .comm import all_reduce_sum_, combine_stats, merge_topk, pick_owned, shard_sum
from .layout import ShardLayout
from .stats import SourceStats

Tensor = torch.Tensor


def full_rows(rows: Tensor, *, ops, layout: ShardLayout, route: Tensor, targets: Tensor,
              hard_labels: Optional[Tensor], student_hidden: Tensor, student: Projection,
              sources: dict[str, tuple[Tensor, Projection]], stats: dict[str, SourceStats], red_w: Tensor,
              config: RouteConfig, per_token: Tensor, student_logprob: Tensor, grads: GradBuffers) -> None:
    """Losses (into ``per_token``), student log-probs and gradients of the rows that need the student's full
    softmax. rows (R,) sorted by route; sources[name] = (hidden (n, H), shard projection)."""
    if not rows.numel():  # (split would yield one empty chunk) the same on every rank: all skip
        return
    inv_tau = 1.0 / config.temperature
    rids = [rid for rid, spec in enumerate(config.routes) if spec.support in ("full", "sampled")]
    ce = config.ce_weight > 0
    total = shard_sum(layout)
    local_y, own_y = layout.localize(targets)
    if ce:
        local_yh, own_yh = layout.localize(hard_labels)
    for chunk in rows.split(config.chunk_size):
        h = ops.hidden(student_hidden.index_select(0, chunk))
        z = ops.logits(h, student)
        y, own = local_y.index_select(0, chunk), own_y.index_select(0, chunk)
        picked = [pick_owned(z, y, own)]
        if ce:
            yh, own_h = local_yh.index_select(0, chunk), own_yh.index_select(0, chunk)
            picked.append(pick_owned(z, yh, own_h))
        (lse,), picked = combine_stats([torch.logsumexp(z, dim=1)], picked, layout)
        # The logits are kept (one more C x V_r buffer) only when the transform's derivative reads them.
        keep = student.transform.grad_needs_logits
        logp = z.sub(lse[:, None]) if keep else z.sub_(lse[:, None])
        z = z if keep else None
        l_y = picked[0] - lse
        student_logprob.index_copy_(0, chunk, l_y)
        loss = torch.zeros(chunk.numel(), dtype=logp.dtype, device=logp.device)
        dz = torch.zeros_like(logp) if grads.any else None
        for rid, pos in _groups(route.index_select(0, chunk), rids):
            spec, weight = config.routes[rid], config.route_weight(rid)
            rows_g = _take(chunk, pos)
            logp_g = _take(logp, pos)
            if spec.support == "full":
                src_hidden, src = sources[spec.source]
                logp_src = ops.logits(ops.hidden(src_hidden.index_select(0, rows_g)), src)
                logp_src.sub_(stats[spec.source].whole.lse.index_select(0, rows_g)[:, None])
                value, g = divergence_and_grad(logp_g, logp_src, spec.divergence, config.jsd_beta, reduce_rows=total)
            else:  # sampled: (l_S - l_src).detach() * l_S, gradient c * (onehot - s); the onehot on its owner
                l_s = _take(l_y, pos)
                c = l_s - stats[spec.source].whole.target_logprob.index_select(0, rows_g)
                value = c * l_s
                g = None
                if dz is not None:
                    g = logp_g.exp().mul_(-c[:, None]).scatter_add_(
                        1, _take(y, pos)[:, None], torch.where(_take(own, pos), c, 0.0)[:, None])
            loss.index_add_(0, pos, weight * value)
            if dz is not None:
                dz.index_add_(0, pos, g.mul_(weight)) if pos.numel() != dz.shape[0] else dz.add_(g, alpha=weight)
        if ce:
            loss.sub_(config.ce_weight * (picked[1] - lse))
            if dz is not None:  # d(-log s_yh)/dz = s - onehot(yh), the onehot on its owner
                onehot = own_h.to(logp.dtype)[:, None]
                dz.add_(logp.exp().scatter_add_(1, yh[:, None], -onehot), alpha=config.ce_weight)
        per_token.index_add_(0, chunk, loss)
        if dz is not None:
            student.transform.chain_grad_(dz, z, inv_tau, red_w.index_select(0, chunk))
            ops.fold_full(dz, h, chunk, student, grads)


def topk_rows(rows: Tensor, *, ops, layout: ShardLayout, route: Tensor, student_hidden: Tensor,
              student: Projection, stats: dict[str, SourceStats], top_k: int, block: int, red_w: Tensor,
              config: RouteConfig, per_token: Tensor, grads: GradBuffers) -> None:
    """Losses and gradients of the rows on top-K routes (any source), in blocks of ``block`` rows.

    rows (R,) sorted by route; stats[source] holds the shard's local top-K candidates of each source a top-K
    route reads; ``top_k`` is the global K (clipped to the whole vocabulary).
    """
    if not rows.numel():
        return
    inv_tau = 1.0 / config.temperature
    rids = [rid for rid, spec in enumerate(config.routes) if spec.support == "topk"]
    from_teacher = [rid for rid in rids if config.routes[rid].source == "teacher"]
    softcap_marks = student.transform.softcap is not None and student.bias is not None
    for chunk in rows.split(block):
        route_c = route.index_select(0, chunk)
        vals, ids = _candidates(chunk, route_c, from_teacher, stats)
        src_vals, src_ids = merge_topk(vals, ids, top_k, layout)
        local_ids, owned = layout.localize(src_ids)
        h = ops.hidden(student_hidden.index_select(0, chunk))
        z, saved = ops.raw_logits_at(h, local_ids, owned, student)  # 0 at other ranks' ids
        z = all_reduce_sum_(z.to(ops.dtype), layout)
        # -inf (a masked vocabulary entry's bias) survives the sum; a soft-cap must keep it -inf
        z = student.transform.apply_(z, inv_tau, z.clone() if softcap_marks else None)
        logp = z.log_softmax(-1)
        logp_src = src_vals.to(ops.dtype).log_softmax(-1)
        loss, dz = topk_divergences(logp, logp_src, route_c, rids, config, grads.any)
        per_token.index_add_(0, chunk, loss)
        if dz is None:
            continue
        student.transform.chain_grad_(dz, z, inv_tau, red_w.index_select(0, chunk))
        d_hidden = ops.fold_topk(dz, h, saved, student, grads)  # reads this rank's ids only
        if d_hidden is not None:
            grads.hidden.index_add_(0, chunk, d_hidden.to(grads.hidden.dtype))


def _candidates(chunk: Tensor, route_c: Tensor, from_teacher: list[int],
                stats: dict[str, SourceStats]) -> tuple[Tensor, Tensor]:
    """Each row's local top-K candidates (values, global ids) of the source its route reads."""
    present = [name for name in ("self", "teacher") if stats.get(name) is not None
               and stats[name].local_ids is not None]
    if len(present) == 1:
        src = stats[present[0]]
        return src.local_vals.index_select(0, chunk), src.local_ids.index_select(0, chunk)
    pick_t = torch.zeros_like(route_c, dtype=torch.bool)
    for rid in from_teacher:
        pick_t |= route_c == rid
    pick_t = pick_t[:, None]
    t, s = stats["teacher"], stats["self"]
    return (torch.where(pick_t, t.local_vals.index_select(0, chunk), s.local_vals.index_select(0, chunk)),
            torch.where(pick_t, t.local_ids.index_select(0, chunk), s.local_ids.index_select(0, chunk)))
