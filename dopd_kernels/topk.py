"""Top-K with the project's tie rule: larger value first, and among equal values the lower vocabulary id.

``torch.topk`` leaves the choice among equal values at the cut unspecified (on the CPU it depends on
the heap order, so a chunk and the full tensor may pick different ids). Raw logits from a GEMM almost
never tie, but two things make ties common: a soft-cap saturates (every logit far above the cap becomes
exactly ``softcap``), and a bias of -inf (a masked vocabulary entry) makes its logit -inf in every row, so
that when K exceeds the finite count the cut falls among -inf ids. The source's top-K then depends on the
tie rule. The Triton kernels and the reference always use this rule; the PyTorch path uses it wherever
``ties_may_cross_cut`` says such ties are possible, so all pick the same ids.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

Tensor = torch.Tensor


def ties_may_cross_cut(cases: Sequence[tuple[Optional[Tensor], bool, int]]) -> list[bool]:
    """For each (bias (V,) or None, soft-capped, k) of a projection whose top-k is taken over its V rows:
    whether exact ties can cross the cut, so that ``topk_lower_id`` must pick (True for a soft-cap; for a
    bias with more than V - k entries at -inf, where the k-th logit of every row is -inf; k = 0: no top-k).

    One host read for all cases together, and only when some bias must be looked at (free on the CPU; on
    CUDA call it before queueing heavy work, so that the read waits for nothing else).
    """
    flags: list[Optional[bool]] = []
    pending = []
    for bias, softcapped, k in cases:
        if not k:
            flags.append(False)
        elif softcapped:
            flags.append(True)
        elif bias is None or k >= bias.shape[0]:  # finite logits, or everything is selected
            flags.append(False)
        else:
            flags.append(None)
            pending.append(torch.isneginf(bias).sum() > bias.shape[0] - k)
    if pending:
        read = iter(torch.stack(pending).tolist())
        flags = [next(read) if f is None else f for f in flags]
    return flags


def topk_lower_id(z: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Values and ids of the ``k`` largest entries of each row of ``z`` (R, V), ties to the lower id.

    The ids within a row are not sorted (every consumer reduces over K). V < 2**24 (the keys are
    floats in z's dtype; float32 or float64).
    Cost: one ``torch.topk`` of k + 1; rows where a tie crosses the cut (all rows on a GPU, where
    finding them would be a host sync) add another topk and four elementwise passes.
    """
    if k >= z.shape[1]:  # everything is selected: no choice to make
        return torch.topk(z, k, dim=1)
    # One more than asked: a tie crosses the cut exactly where the (k+1)-th value equals the k-th.
    vals, idx = torch.topk(z, k + 1, dim=1)
    kth = vals[:, k - 1:k]
    if z.device.type != "cpu":
        return _lower_ids_at_cut(z, kth, k)
    rows = (vals[:, k] == vals[:, k - 1]).nonzero().squeeze(1)  # on the CPU this costs no device sync
    vals, idx = vals[:, :k].contiguous(), idx[:, :k].contiguous()
    if rows.numel():
        fixed_vals, fixed_idx = _lower_ids_at_cut(z.index_select(0, rows), kth.index_select(0, rows), k)
        vals.index_copy_(0, rows, fixed_vals)
        idx.index_copy_(0, rows, fixed_idx)
    return vals, idx


def _lower_ids_at_cut(z: Tensor, kth: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The top-k of rows of z whose k-th largest value is kth (R, 1), taking the lowest ids at the cut."""
    # A key that is +inf above the cut, V - id at the cut and 0 below: its top-K is everything above
    # the cut plus the lowest ids at the cut (fewer than k entries are above it, at least k are >= it).
    ids_desc = torch.arange(z.shape[1], 0, -1, dtype=z.dtype, device=z.device)
    key = (z == kth).to(z.dtype).mul_(ids_desc)
    key.masked_fill_(z > kth, float("inf"))
    idx = torch.topk(key, k, dim=1, sorted=False).indices
    return z.gather(1, idx), idx
