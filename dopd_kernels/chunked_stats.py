"""Statistics pass of the PyTorch path: per-token log-sum-exp, target logit and top-K, chunk by chunk.

For each chunk of C tokens the logits ``(h W^T + b) / tau`` (C x V) live only inside the loop, so
memory is O(C x V + N x K). Cost per model: one N x H x V GEMM, one log-sum-exp pass and (when a
top-K route reads this source) one top-K pass over N x V.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import chunked_ext

Tensor = torch.Tensor


@dataclass
class LinearStats:
    """Per-token statistics of one model over its first V vocabulary rows (temperature applied).

    lse: (N,) log-sum-exp of the scaled logits. target_logit: (N,) scaled logit at the target.
    topk_vals / topk_idx: (N, K) scaled logits and vocabulary ids of the top-K, or None.
    """

    lse: Tensor
    target_logit: Tensor
    topk_vals: Optional[Tensor] = None
    topk_idx: Optional[Tensor] = None

    @property
    def target_logprob(self) -> Tensor:
        """(N,) log-probability of the target token."""
        return self.target_logit - self.lse


def scaled_logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], inv_tau: float) -> Tensor:
    """``(hidden @ weight.T + bias) * inv_tau`` in the weight's dtype. Shapes: (C, H), (V, H) -> (C, V)."""
    z = hidden.to(weight.dtype) @ weight.T if bias is None else torch.addmm(bias, hidden.to(weight.dtype), weight.T)
    if inv_tau != 1.0:
        z.mul_(inv_tau)
    return z


def linear_stats(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Tensor,
    *,
    inv_tau: float,
    top_k: int,
    chunk_size: int,
) -> LinearStats:
    """Log-sum-exp, target logit and (if ``top_k`` > 0) top-K of ``hidden @ weight.T``, without N x V.

    hidden (N, H) any float dtype; weight (V, H) and bias (V,) already in the compute dtype;
    targets (N,) int64 in [0, V). Outputs are in the weight's dtype.
    """
    n, dtype, device = hidden.shape[0], weight.dtype, weight.device
    lse = torch.empty(n, dtype=dtype, device=device)
    target_logit = torch.empty(n, dtype=dtype, device=device)
    topk_vals = torch.empty(n, top_k, dtype=dtype, device=device) if top_k else None
    topk_idx = torch.empty(n, top_k, dtype=torch.int64, device=device) if top_k else None
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        z = scaled_logits(hidden[start:stop], weight, bias, inv_tau)
        fused = chunked_ext.chunk_stats(z, targets[start:stop], top_k)
        if fused is not None:  # the compiled epilogue: one pass per row (dopd_kernels.ext)
            lse[start:stop], target_logit[start:stop] = fused[0], fused[1]
            if top_k:
                topk_vals[start:stop], topk_idx[start:stop] = fused[2], fused[3]
            del z, fused  # free the chunk before the next GEMM allocates its own (one C x V buffer at a time)
            continue
        target_logit[start:stop] = z.gather(1, targets[start:stop, None]).squeeze(1)
        if top_k:
            torch.topk(z, top_k, dim=1, out=(topk_vals[start:stop], topk_idx[start:stop]))
        # log-sum-exp in place on the chunk we own: max, then exp(z - max) summed (no extra C x V buffer)
        zmax = z.amax(dim=1, keepdim=True)
        lse[start:stop] = z.sub_(zmax).exp_().sum(dim=1).log_().add_(zmax.squeeze(1))
    return LinearStats(lse, target_logit, topk_vals, topk_idx)
