"""Per-route lookup tables of the Triton path, built once per (config, device) and cached.

Indexed by route id (0..3), they turn the (N,) route ids into per-row kernel parameters with one
gather on the device. Building them with ``torch.tensor(list, device=cuda)`` on every call would be a
host-to-device copy in the hot path, which CUDA graphs cannot capture; cached, a call only reads them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..config import RouteConfig
from .full_support import KIND_CODES, KIND_NONE, KIND_SAMPLED

Tensor = torch.Tensor


@dataclass(frozen=True)
class RouteTables:
    """(4,) tensors: kind code of the full/sampled kernels, source is teacher, route weight; and for the
    top-K stage: its weight (0 off top-K routes), source is teacher, and one bool mask per divergence."""

    kind: Tensor
    use_teacher: Tensor
    weight: Tensor
    topk_weight: Tensor
    topk_from_teacher: Tensor
    topk_kind: dict


@functools.lru_cache(maxsize=64)
def route_tables(config: RouteConfig, device: torch.device) -> RouteTables:
    """The tables of ``config`` on ``device`` (RouteConfig is frozen and hashable; the group is not part of it)."""
    specs = list(enumerate(config.routes))

    def kind(spec) -> int:
        if spec.support == "full":
            return KIND_CODES[spec.divergence]
        return KIND_SAMPLED if spec.support == "sampled" else KIND_NONE

    def tensor(values, dtype):
        return torch.tensor(values, dtype=dtype, device=device)

    topk = [s.support == "topk" for _, s in specs]
    return RouteTables(
        kind=tensor([kind(s) for _, s in specs], torch.int32),
        use_teacher=tensor([int(s.source == "teacher") for _, s in specs], torch.int32),
        weight=tensor([config.route_weight(r) for r, _ in specs], torch.float32),
        topk_weight=tensor([config.route_weight(r) if t else 0.0 for (r, _), t in zip(specs, topk)], torch.float32),
        topk_from_teacher=tensor([t and s.source == "teacher" for (_, s), t in zip(specs, topk)], torch.bool),
        topk_kind={d: tensor([t and s.divergence == d for (_, s), t in zip(specs, topk)], torch.bool)
                   for d in sorted({s.divergence for (_, s), t in zip(specs, topk) if t})},
    )
