"""Kernel family 3: the top-K routes, in torch (gather + bmm + index_add_).

For each token on a top-K route, the K output-projection rows picked by its source's top-K (from the
statistics kernel) are gathered: z_K = W[idx] h (+ b[idx]), both sides renormalized over the K ids and
``divergences.divergence_and_grad`` gives the value and dz_K; then d h += dz_K W[idx], d W[idx] += dz_K h.
FLOPs: 4 K Hs per token (negligible next to the V-sized GEMMs); bytes: K Hs per token (the gather) plus
K Hs fp32 scatter-adds into d W. This stage is bandwidth-bound and tiny next to the 2 N H V GEMMs; a
Triton kernel would save the (C, K, Hs) staging copy but has not been measured yet (no GPU in the build
session), so the torch version stays until a benchmark says otherwise.
No host sync: every chunk of rows is processed with per-row weights (0 off the top-K routes) instead of
selecting the top-K rows with ``nonzero``; the price is the gather for full-support rows too.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..chunked_losses import fold_topk_grad, gathered_logprobs
from ..chunked_stats import LinearStats
from ..config import RouteConfig
from ..divergences import divergence_and_grad
from .tables import route_tables


def topk_rows(*, route: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
              stats: dict[str, LinearStats], config: RouteConfig, red_w: torch.Tensor, per_token: torch.Tensor,
              grads: dict[str, Optional[torch.Tensor]]) -> None:
    """Add the top-K routes' losses to ``per_token`` (N,) and their gradients to the fp32 ``grads``.

    route (N,) int64 (-1 masked); hidden (N, Hs) student; weight (>= V, Hs), bias or None (student);
    stats[source] with topk_vals / topk_idx (N, K) for each source a top-K route reads.
    """
    n, hs = hidden.shape
    inv_tau = 1.0 / config.temperature
    device = hidden.device
    tables = route_tables(config, device)
    weights, from_teacher, kind_of = tables.topk_weight, tables.topk_from_teacher, tables.topk_kind
    kinds = sorted(kind_of)
    k = next(iter(stats.values())).topk_idx.shape[1]
    chunk_rows = max(1, (config.chunk_size * weight.shape[0]) // max(1, k * hs))  # ~ the memory of a C x V chunk
    for start in range(0, n, chunk_rows):
        sl = slice(start, min(start + chunk_rows, n))
        r = route[sl].clamp_min(0)
        on = route[sl] >= 0
        if len(stats) == 2:
            pick_t = from_teacher[r][:, None]
            idx = torch.where(pick_t, stats["teacher"].topk_idx[sl], stats["self"].topk_idx[sl])
            vals = torch.where(pick_t, stats["teacher"].topk_vals[sl], stats["self"].topk_vals[sl])
        else:
            only = next(iter(stats.values()))
            idx, vals = only.topk_idx[sl], only.topk_vals[sl]
        # Masked rows may hold non-finite hidden states (validation allows it): zero them, 0 * NaN is NaN.
        h = torch.where(on[:, None], hidden[sl].float(), 0.0)
        logp, w_rows = gathered_logprobs(h, idx, weight, bias, inv_tau)
        logp_src = vals.float().log_softmax(-1)
        rw = torch.where(on, weights[r], 0.0)
        loss = torch.zeros_like(rw)
        dz = torch.zeros_like(logp)
        for kind in kinds:
            value, g = divergence_and_grad(logp, logp_src, kind, config.jsd_beta)
            sel = on & kind_of[kind][r]
            loss = loss + torch.where(sel, rw * value, 0.0)
            dz = dz + torch.where(sel[:, None], rw[:, None] * g, 0.0)
        per_token[sl] += loss
        dz = dz * (red_w[sl] * inv_tau)[:, None]
        d_hidden = fold_topk_grad(dz, h, w_rows, idx, grads["weight"], grads["bias"])
        if grads["hidden"] is not None:
            grads["hidden"][sl] += d_hidden
