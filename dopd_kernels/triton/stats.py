"""Kernel 1: fused linear + online log-softmax statistics (+ streaming top-K), never an N x V tensor.

For each token n and model (h, W, b), over the first ``vocab`` rows of W (teacher padding rows are
never read; columns past ``vocab`` are -inf, never 0):
    z = (h W^T + b) / tau,   lse_n = logsumexp_v z,   target_n = z[y_n],   top-K of z (ids and values).
Grid: (token blocks, vocabulary splits). Each program sweeps its split in BLOCK_V columns; each tile is
``tl.dot`` over BLOCK_H slices of the hidden size with an fp32 accumulator, folded into a running
(max, sum-exp), the target logit and, when asked, a running top-BLOCK_V buffer of packed int64 keys
(order-preserving float bits << 32 | vocab id) merged with the tile by a bitonic network. Splits give enough
programs to fill the GPU at small N; their partial results (N x splits floats, N x splits x BLOCK_V keys)
are combined by a tiny torch epilogue (logsumexp over splits, ``torch.topk`` over the candidates).

Shapes: hidden (N, H), weight (>= vocab, H), bias (>= vocab,) or None, targets (N,) in [0, vocab).
FLOPs: 2 N H V.  Bytes: N H + V H (times ~N / (BLOCK_N x #SMs) re-reads, mostly served by L2 because all
programs sweep the vocabulary in the same order) + O(N x splits x K) outputs.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..chunked_stats import LinearStats
from .bitonic import merge_topk
from .blocks import blocks_for, dot_dtype, next_pow2

_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
_INT64_MIN = tl.constexpr(-(2**63))  # a constexpr global: readable from @jit code


@triton.jit
def _tile_logits(h_ptr, w_ptr, rows, row_ok, cols, col_ok, hidden, stride_hn, stride_wv,
                 DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_H: tl.constexpr):
    """(BLOCK_N, BLOCK_V) fp32 tile of h[rows] @ W[cols]^T, zero where masked."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < hidden
        a = tl.load(h_ptr + rows[:, None] * stride_hn + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + cols[None, :] * stride_wv + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if IEEE:
            acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision="ieee")
        else:
            acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc)
    return acc


@triton.jit
def _stats_kernel(h_ptr, w_ptr, b_ptr, y_ptr, m_ptr, s_ptr, tgt_ptr, key_ptr,
                  n_rows, vocab, hidden, v_per_split, n_splits, stride_hn, stride_wv, inv_tau,
                  HAS_BIAS: tl.constexpr, TOPK: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, LOG_V: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, vocab)
    run_max = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    tgt = tl.zeros([BLOCK_N], dtype=tl.float32)
    keys = tl.full([BLOCK_N, BLOCK_V], _INT64_MIN, dtype=tl.int64)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_hi
        z = _tile_logits(h_ptr, w_ptr, rows, row_ok, cols, col_ok, hidden, stride_hn, stride_wv,
                         DOT_DTYPE, IEEE, BLOCK_N, BLOCK_V, BLOCK_H)
        if HAS_BIAS:
            z += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        z = tl.where(col_ok[None, :], z * inv_tau, float("-inf"))
        # Online log-sum-exp: every tile has >= 1 real column, so the new max is finite.
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
        tgt += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        if TOPK:
            # Order-preserving int32 image of the float bits, then (value, id) packed in one int64 key.
            bits = z.to(tl.int32, bitcast=True)
            ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
            blk = (ordered.to(tl.int64) << 32) | cols[None, :].to(tl.int64)
            blk = tl.where(col_ok[None, :], blk, _INT64_MIN)
            # Merge only when some key of the tile beats a row's current smallest kept key.
            floor = tl.min(keys, axis=1)
            if tl.max(tl.where(blk > floor[:, None], 1, 0)) > 0:
                keys = merge_topk(keys, blk, BLOCK_N, BLOCK_V, LOG_V)
    out = rows * n_splits + pid_s
    tl.store(m_ptr + out, run_max, mask=row_ok)
    tl.store(s_ptr + out, run_sum, mask=row_ok)
    tl.store(tgt_ptr + out, tgt, mask=row_ok)
    if TOPK:
        kcols = tl.arange(0, BLOCK_V)
        tl.store(key_ptr + out[:, None] * BLOCK_V + kcols[None, :], keys, mask=row_ok[:, None])


def decode_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed int64 keys -> (fp32 values, int64 vocabulary ids); the inverse of the kernel's packing."""
    ordered = (keys >> 32).to(torch.int32)
    bits = torch.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF)
    return bits.view(torch.float32), keys & 0xFFFFFFFF


def fused_linear_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    *,
    vocab: int,
    inv_tau: float,
    top_k: int = 0,
    n_splits: Optional[int] = None,
) -> LinearStats:
    """Per-token lse, target logit and (``top_k`` > 0) top-K of ``(hidden @ weight[:vocab].T + b) * inv_tau``.

    hidden (N, H), weight (Vw >= vocab, H), bias (Vw,) or None, targets (N,) int64 in [0, vocab) (other ids
    give target_logit 0). Returns fp32 ``LinearStats``; topk_idx is int64 (N, top_k). No host sync.
    """
    n, h = hidden.shape
    blocks = blocks_for(hidden.device)
    hidden = hidden.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    if top_k:
        block_v = max(16, next_pow2(top_k))  # the key buffer is one tile wide
        block_n = blocks.stats_topk_n if block_v <= 128 else 16
    else:
        block_v, block_n = blocks.stats_v, blocks.stats_n
    n_blocks = triton.cdiv(max(n, 1), block_n)
    v_blocks = triton.cdiv(vocab, block_v)
    if n_splits is None:  # enough programs for ~2 waves on the GPU; 2 splits under the interpreter (tests the merge)
        n_splits = 2 if hidden.device.type != "cuda" else triton.cdiv(264, n_blocks)
    n_splits = max(1, min(n_splits, v_blocks))
    v_per_split = triton.cdiv(v_blocks, n_splits) * block_v
    n_splits = triton.cdiv(vocab, v_per_split)  # no empty split
    f32 = dict(dtype=torch.float32, device=hidden.device)
    run_max = torch.empty(n, n_splits, **f32)
    run_sum = torch.empty(n, n_splits, **f32)
    tgt = torch.empty(n, n_splits, **f32)
    keys = torch.empty(n, n_splits, block_v if top_k else 1, dtype=torch.int64, device=hidden.device)
    ddt = dot_dtype(hidden, weight)
    if n:
        _stats_kernel[(n_blocks, n_splits)](
            hidden, weight, bias if bias is not None else weight, targets, run_max, run_sum, tgt, keys,
            n, vocab, h, v_per_split, n_splits, hidden.stride(0), weight.stride(0), float(inv_tau),
            HAS_BIAS=bias is not None, TOPK=bool(top_k), DOT_DTYPE=_TL_DTYPES[ddt], IEEE=ddt == torch.float32,
            BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=blocks.stats_h, LOG_V=block_v.bit_length() - 1, num_warps=blocks.num_warps,
        )
    lse = torch.logsumexp(run_max + run_sum.log(), dim=1)
    out = LinearStats(lse=lse, target_logit=tgt.sum(1))
    if top_k:
        best = torch.topk(keys.reshape(n, -1), top_k, dim=1).values
        out.topk_vals, out.topk_idx = decode_keys(best)
    return out
