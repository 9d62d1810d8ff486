"""Per-route lookup tables of the Triton path, built once per (route table, device) and cached.

Indexed by route id (0..3), they turn the (N,) route ids into per-row kernel parameters with one
gather on the device. Building them with ``torch.tensor(list, device=cuda)`` on every call would be a
host-to-device copy in the hot path, which CUDA graphs cannot capture; cached, a call only reads them.

CUDA graphs: the first call for a route table copies it to the device, so run one call (a warm-up,
forward and backward) before capturing; a call during capture that finds no table raises instead of
copying. A captured graph keeps pointing at the tables it read, so a table used during a capture is
pinned for the life of the process; the other tables are kept for the last ``CACHE_SIZE`` route tables
(the key is what the tables hold: the routes and their weights, not chunk_size, trim, ...).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..config import RouteConfig
from ..devices import capturing as _capturing  # module-level name: tests stand in for it
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


#: Route tables kept per process besides the pinned ones (a few hundred bytes of device memory each).
CACHE_SIZE = 64
_cache: "OrderedDict[tuple, RouteTables]" = OrderedDict()
_pinned: dict[tuple, RouteTables] = {}


def route_tables(config: RouteConfig, device: torch.device) -> RouteTables:
    """The tables of ``config`` on ``device``, cached (see the module docstring for CUDA graphs)."""
    key = (tuple(config.routes), tuple(config.route_weight(r) for r in range(len(config.routes))), device)
    capturing = _capturing(device)
    tables = _pinned.get(key) or _cache.get(key)
    if tables is None:
        if capturing:
            raise RuntimeError("routed_loss (triton): this route table has no device copy yet and a CUDA graph is "
                               "being captured; run one call outside the graph first (a warm-up)")
        tables = _cache[key] = _build(config, device)
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    elif key in _cache:
        _cache.move_to_end(key)
    if capturing:
        _pinned[key] = tables  # a captured graph reads these addresses: never free them
    return tables


def _build(config: RouteConfig, device: torch.device) -> RouteTables:
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
