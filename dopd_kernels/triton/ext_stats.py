"""``stats_impl="cuda"``: the statistics pass as fp32 chunk logits from a cuBLAS GEMM, then the compiled
``dopd::row_stats`` op (``csrc/``, one thread block per row: log-sum-exp, target logit, radix-select top-K).

Beside the Triton modes ("fused", "two_pass") for the GPU benchmark to compare: the GEMM is cuBLAS's at full
tensor-core speed, the epilogue reads the chunk's logits 2-4 times (memory-bound). On CPU tensors (the tests)
the same calls run torch's GEMM and the op's CPU kernel.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import ext
from ..chunked_stats import LinearStats
from ..transform import IDENTITY, LogitTransform


def _fp32_logits(h: torch.Tensor, w_t: torch.Tensor, out: torch.Tensor) -> None:
    """out (C, V) = h @ w_t in fp32: cuBLAS with an fp32 output for half inputs on CUDA, else in fp32."""
    if h.dtype == torch.float32 and w_t.dtype == torch.float32:
        torch.mm(h, w_t, out=out)
    elif h.is_cuda:
        torch.mm(h, w_t, out_dtype=torch.float32, out=out)
    else:
        torch.mm(h.float(), w_t.float(), out=out)


def ext_linear_stats(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                     *, vocab: int, inv_tau: float, top_k: int, chunk: int,
                     transform: LogitTransform = IDENTITY) -> LinearStats:
    """As ``fused_linear_stats`` (fp32 outputs, no host sync), in chunks of ``chunk`` rows of fp32 logits.

    Without a transform the op applies ``inv_tau`` itself (its top-K then orders by the raw logit, as the float64
    reference does); a model's transform is applied in place on the chunk first (one more pass over it), with the
    temperature, and the op reads the final logits.
    """
    device_ok = ext.is_available() and (hidden.device.type == "cpu" or ext.has_cuda())
    if not device_ok:
        raise RuntimeError("stats_impl='cuda' needs the compiled extension with kernels for "
                           f"{hidden.device.type}: python -m dopd_kernels.ext build")
    n = hidden.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    lse, tgt = torch.empty(n, **f32), torch.empty(n, **f32)
    topk_vals = torch.empty(n, top_k, **f32)
    topk_idx = torch.empty(n, top_k, dtype=torch.int64, device=hidden.device)
    logits = torch.empty(min(chunk, max(n, 1)), vocab, **f32)
    w_t = weight[:vocab].T
    b32 = None if bias is None else bias[:vocab].to(torch.float32)
    scale = inv_tau if transform.is_identity else 1.0
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        z = logits[:rows]
        _fp32_logits(hidden[start:start + rows], w_t, z)
        if b32 is not None:
            z.add_(b32)
        if not transform.is_identity:
            transform.apply_(z, inv_tau, b32)
        sl = slice(start, start + rows)
        lse[sl], tgt[sl], topk_vals[sl], topk_idx[sl] = ext.row_stats(z, targets[sl], top_k, scale)
    out = LinearStats(lse=lse, target_logit=tgt)
    if top_k:
        out.topk_vals, out.topk_idx = topk_vals, topk_idx
    return out
