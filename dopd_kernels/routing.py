"""Routing: batch statistics of the advantage gap and sampled-token probabilities, and the route ids.

Shared by every path (reference, torch, Triton). Everything stays on the device: no ``.item()``,
no boolean indexing, so the routing can run inside a CUDA graph. Invalid tokens are carried as NaN,
which ``torch.nanquantile`` ignores, instead of being filtered out (filtering needs the count on
the host). Statistics are computed in float64: they are N-sized, and float64 keeps the decisions of
the float32 and float64 paths identical except on exact ties.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import RouteConfig

Tensor = torch.Tensor

#: Route ids (see config.ROUTES).
LH, LL, HT, HS = 0, 1, 2, 3


@dataclass
class RoutingResult:
    """Per-token routing signals and the batch thresholds.

    route: (N,) int64, 0=LH 1=LL 2=HT 3=HS, -1 for invalid tokens.
    adv_gap, q_self, q_teacher: (N,) float64, raw values (0 at invalid tokens).
    thresholds: 0-d float64 tensors: "adv_gap_bar", "q_self_bar", "q_teacher_bar" (means of the
        normalized kept values) and "adv_gap_cutoff", ... (the (1 - trim) quantiles, raw).
    """

    route: Tensor
    adv_gap: Tensor
    q_self: Tensor
    q_teacher: Tensor
    thresholds: dict[str, Tensor]


def route_tokens(self_logprob: Tensor, teacher_logprob: Tensor, valid: Tensor, config: RouteConfig) -> RoutingResult:
    """Route every valid token (dopd-method.md, "Per-token routing signals" and "The four routes").

    self_logprob, teacher_logprob: (N,) log-probabilities of the sampled token under the privileged
    self and the teacher (temperature applied). valid: (N,) bool.
    """
    valid = valid.to(torch.bool)
    l_s = self_logprob.detach().to(torch.float64)
    l_t = teacher_logprob.detach().to(torch.float64)
    nan = torch.full_like(l_s, float("nan"))
    signals = {
        "adv_gap": (l_t - l_s).abs(),
        "q_self": l_s.exp(),
        "q_teacher": l_t.exp(),
    }
    normalized: dict[str, Tensor] = {}
    thresholds: dict[str, Tensor] = {}
    for name, x in signals.items():
        x_valid = torch.where(valid, x, nan)
        norm, bar, cutoff = _normalize(x_valid, config)
        normalized[name] = norm
        thresholds[f"{name}_bar"] = bar
        thresholds[f"{name}_cutoff"] = cutoff

    high_gap = normalized["adv_gap"] >= thresholds["adv_gap_bar"]
    confident = (normalized["q_self"] + normalized["q_teacher"]) >= (
        thresholds["q_self_bar"] + thresholds["q_teacher_bar"]
    )
    teacher_ahead = signals["q_teacher"] >= signals["q_self"]  # raw probabilities
    route = torch.where(
        high_gap,
        torch.where(teacher_ahead, HT, HS),
        torch.where(confident, LH, LL),
    )
    route = torch.where(valid, route, -1).to(torch.int64)
    zero = torch.zeros_like(l_s)
    return RoutingResult(
        route=route,
        adv_gap=torch.where(valid, signals["adv_gap"], zero),
        q_self=torch.where(valid, signals["q_self"], zero),
        q_teacher=torch.where(valid, signals["q_teacher"], zero),
        thresholds=thresholds,
    )


def _normalize(x: Tensor, config: RouteConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Trimmed normalization of one signal. ``x`` is (N,) with NaN at invalid tokens.

    Returns the normalized local values (N,), the mean of the normalized kept values and the
    (1 - trim) quantile cutoff (0-d). Kept = valid and not above the cutoff, over all ranks of
    ``config.stats_group``.
    """
    pooled = _gather(x, config.stats_group)
    cutoff = (torch.nanquantile(pooled, 1.0 - config.trim) if pooled.numel()
              else torch.full((), float("nan"), dtype=pooled.dtype, device=pooled.device))
    kept = pooled <= cutoff  # False for NaN (invalid) entries
    count = kept.sum().to(pooled.dtype).clamp_min(1.0)
    zero = torch.zeros_like(pooled)
    tiny = torch.finfo(pooled.dtype).tiny
    if config.normalize == "minmax":
        lo = torch.where(kept, pooled, float("inf")).amin() if pooled.numel() else zero.sum()
        hi = torch.where(kept, pooled, float("-inf")).amax() if pooled.numel() else zero.sum()
        shift, scale = lo, (hi - lo).clamp_min(tiny)
    elif config.normalize == "zscore":
        mean = torch.where(kept, pooled, zero).sum() / count
        var = torch.where(kept, (pooled - mean) ** 2, zero).sum() / count
        shift, scale = mean, var.sqrt().clamp_min(tiny)
    else:  # "none"
        # torch.zeros/ones on the device, not new_tensor: a host-to-device copy cannot be graph-captured
        shift = torch.zeros((), dtype=pooled.dtype, device=pooled.device)
        scale = torch.ones((), dtype=pooled.dtype, device=pooled.device)
    # An empty batch leaves shift/scale infinite; invalid tokens are routed -1 regardless.
    shift = torch.nan_to_num(shift, nan=0.0, posinf=0.0, neginf=0.0)
    scale = torch.nan_to_num(scale, nan=1.0, posinf=1.0, neginf=1.0)
    bar = torch.where(kept, (pooled - shift) / scale, zero).sum() / count
    return (x - shift) / scale, bar, cutoff


def _gather(x: Tensor, group) -> Tensor:
    """All ranks' values of ``x`` concatenated (NaN-padded to the longest rank); ``x`` itself without a group."""
    if group is None:
        return x
    import torch.distributed as dist

    world = dist.get_world_size(group)
    if world == 1:
        return x
    # Token counts may differ between ranks; this one small exchange of sizes is the only host sync.
    size = torch.tensor([x.numel()], device=x.device, dtype=torch.int64)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    longest = int(torch.stack(sizes).max())
    padded = torch.full((longest,), float("nan"), dtype=x.dtype, device=x.device)
    padded[: x.numel()] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat(parts)
