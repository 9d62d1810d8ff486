"""The collectives of the vocabulary-parallel loss (torch.distributed only), and a traffic counter.

Every collective here runs over the vocabulary group (``ShardLayout.group``) and is called by every rank
of it in the same order with the same shapes: the shapes derive from replicated inputs (the token
arrays) and from values every rank computes identically (routes from all-gathered statistics).
Results that feed a decision (log-sum-exps and picked logits, which decide the routes; the merged top-K)
are combined from an all-gather on every rank with the same local arithmetic, so they are bitwise equal
on all ranks, whatever the backend's reduction order.

``TRAFFIC`` counts the elements each rank contributes per collective kind (the benchmark and a test
compare it with ``bench/vocab_parallel.py``'s prediction).
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch
import torch.distributed as dist

from ..topk import topk_lower_id
from .layout import ShardLayout

Tensor = torch.Tensor

#: Elements contributed by this rank, per collective kind ("all_gather", "all_reduce"), since the last clear.
TRAFFIC: Counter = Counter()

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather(x: Tensor, layout: ShardLayout) -> Tensor:
    """(world, *x.shape): every rank's ``x``, in the group's rank order."""
    x = x.contiguous()
    TRAFFIC["all_gather"] += x.numel()
    if layout.world == 1 or x.numel() == 0:  # shapes are the same on every rank: all skip together
        return x.unsqueeze(0).expand(layout.world, *x.shape)
    out = x.new_empty((layout.world * x.shape[0], *x.shape[1:]) if x.dim() else (layout.world,))
    _all_gather_single(out, x if x.dim() else x.reshape(1), group=layout.group)
    return out.view(layout.world, *x.shape)


def all_reduce_sum_(x: Tensor, layout: ShardLayout) -> Tensor:
    """``x`` summed over the group, in place (``x`` must be contiguous); returns ``x``."""
    TRAFFIC["all_reduce"] += x.numel()
    if layout.world > 1 and x.numel():
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=layout.group)
    return x


def shard_sum(layout: ShardLayout):
    """A ``reduce_rows`` for ``divergences.divergence_and_grad``: per-row partial sums summed over the shards."""
    return lambda partial: all_reduce_sum_(partial.contiguous(), layout)


def combine_stats(local_lse: Sequence[Tensor], picked: Sequence[Tensor], layout: ShardLayout
                  ) -> tuple[list[Tensor], list[Tensor]]:
    """Global log-sum-exps and picked logits from the shards' parts, in one all-gather.

    local_lse: (n,) log-sum-exps over each rank's own vocabulary rows; picked: (n,) a logit at an id that
    exactly one rank owns (the others pass 0). Returns the log-sum-exps over the whole vocabulary and the
    owners' logits, bitwise equal on every rank.
    """
    parts = all_gather(torch.stack([*local_lse, *picked]), layout)  # (world, m, n)
    n_lse = len(local_lse)
    lse = torch.logsumexp(parts[:, :n_lse], dim=0) if n_lse else parts[:0]
    total = parts[:, n_lse:].sum(0)
    return list(lse.unbind(0)), list(total.unbind(0))


def pick_owned(z: Tensor, local_ids: Tensor, owned: Tensor) -> Tensor:
    """(C,) z[c, local_ids[c]] where this rank owns the id, else 0. z (C, V_r), local_ids (C,) in range."""
    return torch.where(owned, z.gather(1, local_ids[:, None]).squeeze(1), 0.0)


def sort_by_id(vals: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """A local top-K (values, ids) reordered by increasing id, so that the ranks' lists concatenated in rank
    order are in global id order (the merge's tie rule then picks the lower id)."""
    ids, order = ids.sort(dim=1)
    return vals.gather(1, order), ids


def merge_topk(vals: Tensor, ids: Tensor, k: int, layout: ShardLayout) -> tuple[Tensor, Tensor]:
    """The global top-``k`` of each row from every rank's local top-K, in one all-gather.

    vals (C, K_r) logits and ids (C, K_r) global ids of this rank's local top-K (K_r = min(k, V_r), sorted by
    id: ``sort_by_id``). The ranks' lists are padded to the longest for the exchange, the padding dropped
    again, and ``topk_lower_id`` picks among the C x sum(K_r) candidates with the project's rule (larger
    value first, then the lower id). Returns (C, k) values and int64 global ids (ids unsorted).
    """
    widths = layout.topk_widths(k)
    pad = max(widths) - vals.shape[1]
    payload = torch.cat([vals, ids.to(vals.dtype)], dim=1)  # ids < 2**24: exact in float32
    if pad:
        payload = torch.nn.functional.pad(payload.view(-1, 2, vals.shape[1]), (0, pad)).view(vals.shape[0], -1)
    width = max(widths)
    parts = all_gather(payload, layout).view(layout.world, vals.shape[0], 2, width)
    cand = torch.cat([parts[r, :, :, :w] for r, w in enumerate(widths)], dim=2)  # (C, 2, sum K_r)
    top_vals, pos = topk_lower_id(cand[:, 0].contiguous(), k)
    return top_vals, cand[:, 1].gather(1, pos).to(torch.int64)
