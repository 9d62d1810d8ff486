"""Route statistics of one micro-batch as one tensor, pooled over the data-parallel ranks for TRL's metrics.

Each rank packs counts and sums (route counts, per-route loss sums, signal sums, valid tokens) and the
thresholds into one float64 vector; the trainer gathers the vectors (one collective, one host copy)
and :func:`summarize` turns them into global fractions and means. The thresholds are the same on every
rank (the routing statistics are global), so their mean over ranks is that value.
"""

from __future__ import annotations

import torch

from dopd_kernels import ROUTES, RoutedLossOutput

Tensor = torch.Tensor
PREFIX = "dopd/"
SIGNALS = ("adv_gap", "q_self", "q_teacher")


def pack(out: RoutedLossOutput) -> tuple[Tensor, list[str]]:
    """The micro-batch's sums as a float64 vector, and the threshold names in the order packed."""
    route = out.route.reshape(-1)
    valid = route >= 0
    ptl = out.per_token_loss.detach().reshape(-1).to(torch.float64)
    parts = [valid.sum().to(torch.float64).reshape(1)]
    for rid in range(len(ROUTES)):
        in_route = route == rid
        parts += [in_route.sum().to(torch.float64).reshape(1), torch.where(in_route, ptl, 0.0).sum().reshape(1)]
    for sig in SIGNALS:
        x = getattr(out, sig).detach().reshape(-1).to(torch.float64)
        parts.append(torch.where(valid, x, 0.0).sum().reshape(1))
    names = sorted(out.thresholds)
    parts += [out.thresholds[k].detach().to(torch.float64).reshape(1).to(route.device) for k in names]
    return torch.cat([p.to(route.device) for p in parts]), names


def summarize(gathered: Tensor, threshold_names: list[str]) -> dict[str, float]:
    """Metrics named ``dopd/...`` from the gathered ``(ranks, len)`` vectors of :func:`pack`."""
    rows = gathered.reshape(-1, gathered.shape[-1]).to(torch.float64)
    n_sums = 1 + 2 * len(ROUTES) + len(SIGNALS)
    sums = rows[:, :n_sums].sum(0).tolist()
    thresholds = rows[:, n_sums:].mean(0).tolist()
    n_tokens = sums[0]
    denom = max(n_tokens, 1.0)
    metrics = {f"{PREFIX}n_tokens": n_tokens}
    for rid, name in enumerate(ROUTES):
        count, loss_sum = sums[1 + 2 * rid], sums[2 + 2 * rid]
        metrics[f"{PREFIX}frac/{name}"] = count / denom
        metrics[f"{PREFIX}loss/{name}"] = loss_sum / max(count, 1.0)
    for i, sig in enumerate(SIGNALS):
        metrics[f"{PREFIX}{sig}_mean"] = sums[1 + 2 * len(ROUTES) + i] / denom
    for name, value in zip(threshold_names, thresholds):
        metrics[f"{PREFIX}threshold/{name}"] = value
    return metrics
