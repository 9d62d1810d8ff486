"""Stage 1 of the vocabulary-parallel loss: the self and teacher statistics over the whole vocabulary.

Each rank runs the single-process statistics pass on its own rows (2 GEMMs of N x H x V_r), then one
all-gather of 4 values per token (each model's log-sum-exp over the shard and the sampled token's logit
where the rank owns it, 0 elsewhere) gives every rank the log-sum-exps and the target log-probs over the
whole vocabulary, bitwise equal on all ranks, so that they route identically. The shard's top-K stays
local (global ids, sorted by id) until the loss stage merges the one its route reads (``comm.merge_topk``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..chunked_losses import Projection
from ..chunked_stats import LinearStats
from .comm import combine_stats, sort_by_id
from .layout import ShardLayout

Tensor = torch.Tensor


@dataclass
class SourceStats:
    """One model's statistics: lse (n,) and target_logit (n,) over the whole vocabulary (scaled), and this
    rank's top-K candidates, values (n, K_r) and global ids (n, K_r) sorted by id, or None."""

    whole: LinearStats
    local_vals: Optional[Tensor] = None
    local_ids: Optional[Tensor] = None


def source_stats(ops, models: dict[str, tuple[Tensor, Projection]], targets: Tensor, layout: ShardLayout,
                 top_k: int, topk_sources: frozenset) -> dict[str, SourceStats]:
    """Statistics of each model in ``models`` (name -> (hidden (n, H), shard projection)); top-K (K_r =
    min(top_k, V_r) per rank) for the names in ``topk_sources``. targets (n,) global ids in range."""
    local_targets, owned = layout.localize(targets)
    width = min(top_k, layout.local)
    names = sorted(models)
    local = {name: ops.stats(models[name][0], models[name][1], local_targets, width if name in topk_sources else 0)
             for name in names}
    lse, picked = combine_stats([local[n].lse for n in names],
                                [torch.where(owned, local[n].target_logit, 0.0) for n in names], layout)
    out = {}
    for i, name in enumerate(names):
        part = local[name]
        vals = ids = None
        if part.topk_idx is not None:
            vals, ids = sort_by_id(part.topk_vals, part.topk_idx + layout.offset)
        out[name] = SourceStats(LinearStats(lse[i], picked[i]), vals, ids)
    return out


def student_logprob(ops, hidden: Tensor, student: Projection, targets: Tensor, layout: ShardLayout) -> Tensor:
    """(n,) the student's log-prob of ``targets`` over the whole vocabulary (one statistics pass on the shard
    and one all-gather: a collective, so every rank of the group must call it)."""
    local_targets, owned = layout.localize(targets)
    part = ops.stats(hidden, student, local_targets, 0)
    (lse,), (target,) = combine_stats([part.lse], [torch.where(owned, part.target_logit, 0.0)], layout)
    return target - lse
