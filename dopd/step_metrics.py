"""The loss weight and the metrics of one micro-batch over all data-parallel ranks.

Exact over the global batch. DDP and FSDP2 average the ranks' gradients, so rank r scales its loss by
``W * c_r / C`` (:func:`rank_loss_weight`), where ``c_r`` is its normalizer (sequences for ``seq_mean``,
valid tokens for ``token_mean``) and ``C`` the sum over ranks: the average of the scaled gradients is the
gradient of the loss on the union of the ranks' rollouts. (``seq_mean`` over equal sequence counts, the
trainer's case, gives a weight of exactly 1; ``sum`` gives W.)

Metrics (:func:`global_metrics`): every count and sum goes into one vector, all-reduced once, and the
ratios are formed after it -- route fractions from global counts, never averages of per-rank ratios.
Without a process group the result equals ``RoutedLossOutput.metrics()``.
"""

from __future__ import annotations

from typing import Any

import torch

from dopd.distributed import DistContext


def rank_loss_weight(valid: torch.Tensor, reduction: str, ctx: DistContext) -> torch.Tensor:
    """This rank's loss multiplier (0-d, on ``valid``'s device; no host sync). ``valid`` is (B, T) bool."""
    one = torch.ones((), dtype=torch.float32, device=valid.device)
    if not ctx.enabled or ctx.world_size == 1:
        return one
    if reduction == "sum":
        return one * ctx.world_size
    rows = valid.reshape(valid.shape[0], -1) if valid.dim() > 1 else valid.reshape(1, -1)
    local = (rows.any(-1).sum() if reduction == "seq_mean" else rows.sum()).to(torch.float64)
    total = ctx.all_reduce(local.clone())
    return (ctx.world_size * local / total.clamp_min(1.0)).to(torch.float32)


def global_metrics(out: Any, weight: torch.Tensor, ctx: DistContext,
                   response_lengths: torch.Tensor) -> tuple[dict[str, float], list[int]]:
    """Route fractions, per-route losses, signal means, thresholds and response length over all ranks,
    and the ranks whose loss was not finite (every rank gets the same answer, in one all-reduce).

    ``weight`` is :func:`rank_loss_weight`: the global loss is ``sum_r weight_r * loss_r / W``. Thresholds
    are the mean over ranks (identical on every rank with global routing statistics).
    """
    from dopd_kernels import ROUTES

    world = ctx.world_size
    route = out.route.reshape(-1)
    valid = route >= 0
    device = route.device
    ptl = out.per_token_loss.detach().reshape(-1).to(torch.float64)
    loss = out.loss.detach().to(torch.float64).reshape(())
    names: list[str] = ["n_tokens", "loss"]
    values: list[torch.Tensor] = [valid.sum().to(torch.float64), loss * weight.to(torch.float64) / world]
    for rid, rname in enumerate(ROUTES):
        in_route = route == rid
        names += [f"count/{rname}", f"sum/{rname}"]
        values += [in_route.sum().to(torch.float64), torch.where(in_route, ptl, 0.0).sum()]
    signals = ("adv_gap", "q_self", "q_teacher", "student_logprob")
    for sig in signals:
        x = getattr(out, sig).detach().reshape(-1).to(torch.float64)
        names.append(f"sum/{sig}")
        values.append(torch.where(valid, x, 0.0).sum())
    for key, thr in out.thresholds.items():
        names.append(f"threshold/{key}")
        values.append(thr.detach().to(torch.float64).reshape(()) / world)
    lengths = response_lengths.to(device=device, dtype=torch.float64)
    names += ["sum/response_len", "count/responses"]
    values += [lengths.sum(), torch.tensor(float(lengths.numel()), dtype=torch.float64, device=device)]
    bad = torch.zeros(world, dtype=torch.float64, device=device)
    bad[ctx.rank] = (~torch.isfinite(loss)).to(torch.float64)
    vec = torch.cat([torch.stack([v.to(device) for v in values]), bad])
    host = ctx.all_reduce(vec).cpu().tolist()  # the one collective (and host sync) of the metrics
    got = dict(zip(names, host[: len(names)]))
    bad_ranks = [r for r, flag in enumerate(host[len(names):]) if flag]
    n = got["n_tokens"]
    denom = max(n, 1.0)
    metrics = {"loss": got["loss"], "n_tokens": n}
    for rname in ROUTES:
        count = got[f"count/{rname}"]
        metrics[f"frac/{rname}"] = count / denom
        metrics[f"loss/{rname}"] = got[f"sum/{rname}"] / max(count, 1.0)
    for sig in signals:
        metrics[f"{sig}_mean"] = got[f"sum/{sig}"] / denom
    for key in out.thresholds:
        metrics[f"threshold/{key}"] = got[f"threshold/{key}"]
    metrics["response_len"] = got["sum/response_len"] / max(got["count/responses"], 1.0)
    return metrics, bad_ranks
