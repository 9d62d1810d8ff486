"""The float64 oracle of the vocabulary-parallel loss (``backend="reference"`` with ``vocab_group``).

It all-gathers every rank's weight and bias shards (the O(V x H) exchange the fused paths avoid), builds
the full logits and runs the single-process reference (``reference.reference_from_logits``); autograd
then gives the local shards' gradients (the matching rows of the full gradient) and, for d hidden, either
the full gradient (``reduce_hidden_grad``) or this shard's part only (the other shards' logits are formed
from detached hidden states). Tests and small problems only.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..config import RouteConfig
from ..output import RoutedLossOutput
from ..reference import reference_from_logits
from ..transform import IDENTITY, LogitTransform
from .comm import all_gather
from .layout import ShardLayout

Tensor = torch.Tensor


def gather_shards(x: Optional[Tensor], layout: ShardLayout) -> Optional[list[Tensor]]:
    """Every rank's shard of ``x`` (rows first), detached, in rank order; None stays None (on every rank)."""
    if x is None:
        return None
    width = max(layout.sizes)
    padded = x.detach().new_zeros((width, *x.shape[1:]))
    padded[: x.shape[0]] = x.detach()
    parts = all_gather(padded, layout)
    return [parts[r, :size] for r, size in enumerate(layout.sizes)]


def sharded_reference(
    student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor,
    self_hidden: Tensor, target_ids: Tensor, valid: Tensor, *, layout: ShardLayout, reduce_hidden_grad: bool = True,
    student_bias: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None, self_weight: Optional[Tensor] = None,
    self_bias: Optional[Tensor] = None, hard_labels: Optional[Tensor] = None, config: RouteConfig,
    student_transform: LogitTransform = IDENTITY, teacher_transform: LogitTransform = IDENTITY,
    self_transform: LogitTransform = IDENTITY,
) -> RoutedLossOutput:
    """The reference loss on the concatenated shards (float64, full logits). Arguments as
    ``vocab_parallel_routed_loss``; the biases must be given on every rank or on none."""
    f64 = torch.float64

    def shards(x: Optional[Tensor], trained: bool) -> Optional[list[Tensor]]:
        parts = gather_shards(x, layout)
        if parts is not None:
            parts = [p.to(f64) for p in parts]
            if trained:  # this rank's own shard carries autograd, so that its rows get their gradient
                parts[layout.rank] = x.to(f64)
        return parts

    def logits(hidden: Tensor, weights: list[Tensor], biases: Optional[list[Tensor]], transform: LogitTransform,
               partial_hidden: bool = False) -> Tensor:
        h = hidden.to(f64)
        blocks = []
        for r, w in enumerate(weights):
            # partial_hidden: only this rank's block differentiates into the hidden states (its part of d hidden)
            z = (h if not partial_hidden or r == layout.rank else h.detach()) @ w.T
            blocks.append(z if biases is None else z + biases[r])
        return transform.apply(torch.cat(blocks, dim=-1))

    s_w, s_b = shards(student_weight, True), shards(student_bias, True)
    with torch.no_grad():
        t_logits = logits(teacher_hidden, shards(teacher_weight, False), shards(teacher_bias, False), teacher_transform)
        if self_weight is None:
            p_w, p_b = [w.detach() for w in s_w], None if s_b is None else [b.detach() for b in s_b]
        else:
            p_w, p_b = shards(self_weight, False), shards(self_bias, False)
        p_logits = logits(self_hidden, p_w, p_b, self_transform)
    s_logits = logits(student_hidden, s_w, s_b, student_transform, partial_hidden=not reduce_hidden_grad)
    return reference_from_logits(s_logits, t_logits, p_logits, target_ids, valid, hard_labels=hard_labels,
                                 config=config)
