"""Statistics pass of the PyTorch path: per-token log-sum-exp, target logit and top-K, chunk by chunk.

For each chunk of C tokens the logits ``transform(h W^T + b) / tau`` (C x V) live only inside the
loop, so memory is O(C x V + N x K); a bf16/fp16 projection is converted to the fp32 compute dtype one
block of vocabulary rows at a time, never as a whole. Cost per model: one N x H x V GEMM, one
log-sum-exp pass and (when a top-K route reads this source) one top-K pass over N x V; a soft-cap adds
a few elementwise passes. Where exact ties can cross the top-K cut (a soft-cap, or a bias with -inf
entries: ``topk.ties_may_cross_cut``) the top-K takes the tie rule of ``topk.topk_lower_id``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from .topk import ties_may_cross_cut, topk_lower_id
from .transform import IDENTITY, LogitTransform
from . import chunked_ext

Tensor = torch.Tensor


@dataclass
class LinearStats:
    """Per-token statistics of one model over its first V vocabulary rows (transform and temperature applied).

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


#: Elements of the converted block of a projection stored in a narrower dtype than the compute dtype
#: (bf16 weights, fp32 compute): 64 MiB in fp32, however large V x H is (see ``vocab_blocks``). Above
#: glibc's largest mmap threshold (32 MiB), so the block goes back to the OS when freed instead of
#: staying in the heap.
CONVERT_BLOCK_ELEMENTS = 1 << 24


def vocab_blocks(weight: Tensor, dtype: torch.dtype) -> Iterator[tuple[int, Tensor]]:
    """``(first row, rows)`` of ``weight`` (V, H) in ``dtype``, a block of rows at a time.

    A weight already in ``dtype`` is one block (no copy). Otherwise the rows are converted into one
    reused buffer of at most CONVERT_BLOCK_ELEMENTS, so a bf16 projection never gets a full fp32 copy:
    the extra memory is that buffer instead of V x H (the GEMMs still accumulate in ``dtype``). Each
    yielded block is overwritten by the next: use it before asking for the next one.
    """
    if weight.dtype == dtype:
        yield 0, weight
        return
    rows = min(weight.shape[0], max(1, CONVERT_BLOCK_ELEMENTS // max(1, weight.shape[1])))
    buffer = torch.empty(rows, weight.shape[1], dtype=dtype, device=weight.device)
    for start in range(0, weight.shape[0], rows):
        block = buffer[: min(rows, weight.shape[0] - start)]
        yield start, block.copy_(weight[start: start + block.shape[0]])


def scaled_logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], inv_tau: float,
                  transform: LogitTransform = IDENTITY, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``transform(hidden @ weight.T + bias) * inv_tau`` in ``dtype`` (default: the weight's).
    (C, H), (V, H) -> (C, V).

    ``bias`` must already be in ``dtype``; a narrower weight is converted per vocabulary block.
    """
    dtype = dtype or weight.dtype
    h = hidden.to(dtype)
    if weight.dtype == dtype:
        z = h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)
    else:
        z = torch.empty(h.shape[0], weight.shape[0], dtype=dtype, device=h.device)
        for start, block in vocab_blocks(weight, dtype):
            cols = z[:, start: start + block.shape[0]]
            if bias is None:
                torch.mm(h, block.T, out=cols)
            else:
                torch.addmm(bias[start: start + block.shape[0]], h, block.T, out=cols)
    return transform.apply_(z, inv_tau, bias)


def logits_grad_to_hidden(dz: Tensor, weight: Tensor) -> Tensor:
    """``dz @ weight`` in dz's dtype: (C, V), (V, H) -> (C, H); a narrower weight is converted per block."""
    if weight.dtype == dz.dtype:
        return dz @ weight
    out = torch.zeros(dz.shape[0], weight.shape[1], dtype=dz.dtype, device=dz.device)
    for start, block in vocab_blocks(weight, dz.dtype):
        out.addmm_(dz[:, start: start + block.shape[0]], block)
    return out


def linear_stats(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Tensor,
    *,
    inv_tau: float,
    top_k: int,
    chunk_size: int,
    transform: LogitTransform = IDENTITY,
    dtype: Optional[torch.dtype] = None,
    exact_ties: Optional[bool] = None,
) -> LinearStats:
    """Log-sum-exp, target logit and (if ``top_k`` > 0) top-K of ``transform(hidden @ weight.T + bias)``
    over the temperature, without N x V.

    hidden (N, H) any float dtype; weight (V, H) in the compute ``dtype`` (default: the weight's) or a
    narrower one (converted per block, see ``vocab_blocks``); bias (V,) in the compute dtype;
    targets (N,) int64 in [0, V). Outputs are in the compute dtype.
    ``exact_ties``: whether the top-K must break exact ties by the project's rule (lower id), as the
    reference does; None decides with ``topk.ties_may_cross_cut`` (a soft-cap, or enough -inf in the bias:
    one host read on CUDA, which a caller deciding for several projections at once can batch). Elsewhere
    ties are as rare as in the raw GEMM and plain topk is cheaper.
    """
    if exact_ties is None:
        (exact_ties,) = ties_may_cross_cut([(bias, transform.softcap is not None, top_k)])
    n, dtype, device = hidden.shape[0], dtype or weight.dtype, weight.device
    lse = torch.empty(n, dtype=dtype, device=device)
    target_logit = torch.empty(n, dtype=dtype, device=device)
    topk_vals = torch.empty(n, top_k, dtype=dtype, device=device) if top_k else None
    topk_idx = torch.empty(n, top_k, dtype=torch.int64, device=device) if top_k else None
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        z = scaled_logits(hidden[start:stop], weight, bias, inv_tau, transform, dtype)
        fused = chunked_ext.chunk_stats(z, targets[start:stop], top_k)
        if fused is not None:  # the compiled epilogue: one pass per row (dopd_kernels.ext)
            lse[start:stop], target_logit[start:stop] = fused[0], fused[1]
            if top_k:
                topk_vals[start:stop], topk_idx[start:stop] = fused[2], fused[3]
            del z, fused  # free the chunk before the next GEMM allocates its own (one C x V buffer at a time)
            continue
        target_logit[start:stop] = z.gather(1, targets[start:stop, None]).squeeze(1)
        if top_k and exact_ties:
            topk_vals[start:stop], topk_idx[start:stop] = topk_lower_id(z, top_k)
        elif top_k:
            torch.topk(z, top_k, dim=1, out=(topk_vals[start:stop], topk_idx[start:stop]))
        # log-sum-exp in place on the chunk we own: max, then exp(z - max) summed (no extra C x V buffer)
        # a row of -inf only (a vocabulary shard masked whole) has log-sum-exp -inf, not -inf - -inf = NaN
        zmax = z.amax(dim=1, keepdim=True).nan_to_num_(neginf=0.0)
        lse[start:stop] = z.sub_(zmax).exp_().sum(dim=1).log_().add_(zmax.squeeze(1))
    return LinearStats(lse, target_logit, topk_vals, topk_idx)
