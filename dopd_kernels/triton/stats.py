"""Kernel 1: fused linear + online log-softmax statistics (+ streaming top-K), never an N x V tensor.

For each token n and model (h, W, b), over the first ``vocab`` rows of W (teacher padding rows are
never read; columns past ``vocab`` are -inf, never 0):
    z = T(h W^T + b) / tau,   lse_n = logsumexp_v z,   target_n = z[y_n],   top-K of z (ids and values),
with T the model's ``LogitTransform`` (``softcap.py``: a multiplier folds into 1 / tau; a soft-cap adds one
tanh per logit to the tile's epilogue, in a variant compiled only for soft-capped models).
Grid: (token blocks, vocabulary splits). Each program sweeps its split in BLOCK_V columns; each tile is
``tl.dot`` over BLOCK_H slices of the hidden size with an fp32 accumulator, folded into a running
(max, sum-exp), the target logit and, when asked, the row's top-K candidate list (``candidates.py``: a
threshold compare per logit, an append of the few keys above it, an exact cut to K when a list fills).
The top-K therefore costs no register buffer and no sorting network, and keeps the GEMM-sized token
block (an earlier bitonic-merge design had to shrink the block to 16 rows to compile at all).
Splits give enough programs to fill the GPU at small N; their partial results (N x splits floats, the
N x splits x CAP candidate lists) are combined by a small torch epilogue (logsumexp over splits,
``torch.topk`` over the live candidates).

Shapes: hidden (N, H), weight (>= vocab, H), bias (>= vocab,) or None, targets (N,) in [0, vocab).
FLOPs: 2 N H V.  Bytes: N H + V H (times ~N / (BLOCK_N x #SMs) re-reads, mostly served by L2 because all
programs sweep the vocabulary in the same order) + N x splits x CAP x 8 candidate bytes (CAP = 512 at
K = 128: 4 KB per token and split).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..chunked_stats import LinearStats
from ..transform import IDENTITY, LogitTransform
from .blocks import blocks_for, dot_args, dot_dtype, next_pow2
from .candidates import NO_ID, NO_ID_HOST, above, append, canonical, compact, list_capacity
from .matmul import matmul_into
from .softcap import KernelTransform, kernel_transform, transform_logits

#: The epilogue of logits that are already final (two-pass mode): times 1.0.
FINAL = KernelTransform(False, 1.0, 1.0)

@triton.jit
def _tile_logits(h_ptr, w_ptr, rows, row_ok, cols, col_ok, hidden, stride_hn, stride_wv,
                 DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_H: tl.constexpr):
    """(BLOCK_N, BLOCK_V) fp32 tile of h[rows] @ W[cols]^T, zero where masked.

    Addresses and masks are rebuilt each step on purpose: loop-carried pointer tensors and an unmasked
    even-H variant both measured more ptxas spills for sm_90 (2026-11-28).
    """
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < hidden
        # int64 row offsets: N x H and V x H may pass 2^31 (1M tokens, or a 16384-wide teacher)
        a = tl.load(h_ptr + rows.to(tl.int64)[:, None] * stride_hn + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + cols.to(tl.int64)[None, :] * stride_wv + ks[:, None],
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if IEEE:
            acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision="ieee")
        else:
            acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc)
    return acc


@triton.jit
def _stats_kernel(h_ptr, w_ptr, b_ptr, y_ptr, m_ptr, s_ptr, tgt_ptr, val_ptr, id_ptr, cnt_ptr,
                  n_rows, vocab, hidden, v_per_split, n_splits, stride_hn, stride_wv, pre, post,
                  HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, TOPK: tl.constexpr, DOT_DTYPE: tl.constexpr,
                  IEEE: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, KB: tl.constexpr,
                  CAP: tl.constexpr, CH: tl.constexpr, FROM_LOGITS: tl.constexpr):
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
    out = rows * n_splits + pid_s
    # Top-K: this program's CAP-slot candidate list per row (candidates.py), its fill and its threshold key
    # (value, id), initially admitting every key.
    v_base = val_ptr + out.to(tl.int64) * CAP
    i_base = id_ptr + out.to(tl.int64) * CAP
    count = tl.zeros([BLOCK_N], dtype=tl.int32)
    t_val = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    t_id = tl.full([BLOCK_N], NO_ID, dtype=tl.int32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_hi
        if FROM_LOGITS:  # two-pass mode: h_ptr holds fp32 logits (N, V), already biased and transformed
            z = tl.load(h_ptr + rows.to(tl.int64)[:, None] * stride_hn + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        else:
            z = _tile_logits(h_ptr, w_ptr, rows, row_ok, cols, col_ok, hidden, stride_hn, stride_wv,
                             DOT_DTYPE, IEEE, BLOCK_N, BLOCK_V, BLOCK_H)
        if HAS_BIAS:
            z += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        # The model's transform and 1 / tau (softcap.py): post * z, or post * tanh(pre * z) keeping -inf.
        z = tl.where(col_ok[None, :], transform_logits(z, pre, post, SOFTCAP), float("-inf"))
        # Online log-sum-exp. A tile (even a whole split) may hold only -inf logits (a -inf bias masking part
        # of the vocabulary): the max stays -inf, and shifting by 0 instead keeps exp(-inf - -inf) out.
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(z - shift[:, None]), axis=1)
        run_max = new_max
        tgt += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        if TOPK:
            zc = canonical(z)
            # Rows past n_rows and columns past the split never enter.
            take = row_ok[:, None] & col_ok[None, :] & above(zc, cols, t_val, t_id)
            ids = tl.broadcast_to(cols[None, :], [BLOCK_N, BLOCK_V])
            count = append(zc, ids, take, v_base, i_base, count)
            if tl.max(count, axis=0) > CAP - BLOCK_V:  # the next tile could overflow some row: cut to KB
                t_val, t_id, count = compact(v_base, i_base, count, t_val, t_id, KB, BLOCK_N, CH)
    if TOPK:
        if tl.max(count, axis=0) > KB:  # a last cut: the epilogue then reads KB slots, not CAP
            t_val, t_id, count = compact(v_base, i_base, count, t_val, t_id, KB, BLOCK_N, CH)
        tl.store(cnt_ptr + out, count, mask=row_ok)
    tl.store(m_ptr + out, run_max, mask=row_ok)
    tl.store(s_ptr + out, run_sum, mask=row_ok)
    tl.store(tgt_ptr + out, tgt, mask=row_ok)


def encode_keys(vals: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """fp32 values and int32 ids -> int64 keys, as ``candidates.pack`` (larger value, then smaller id, first)."""
    bits = vals.view(torch.int32)
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (ordered.to(torch.int64) << 32) | (NO_ID_HOST - ids.to(torch.int64))


def decode_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed int64 keys -> (fp32 values, int64 vocabulary ids); the inverse of ``encode_keys``.

    An empty slot (INT64_MIN: only where a row has fewer than K keys, e.g. NaN logits of a masked token,
    which never enter the candidate list) decodes to id 0 (so that later gathers stay in range) and a NaN
    value; such rows are never on a route.
    """
    ordered = (keys >> 32).to(torch.int32)
    bits = torch.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF)
    ids = NO_ID_HOST - (keys & 0xFFFFFFFF)
    return bits.view(torch.float32), torch.where(keys == -(2**63), 0, ids)


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
    impl: Optional[str] = None,
    transform: LogitTransform = IDENTITY,
) -> LinearStats:
    """Per-token lse, target logit and (``top_k`` > 0) top-K of ``transform(hidden @ weight[:vocab].T + b) * inv_tau``.

    hidden (N, H), weight (Vw >= vocab, H), bias (Vw,) or None, targets (N,) int64 in [0, vocab) (other ids
    give target_logit 0). Returns fp32 ``LinearStats``; topk_idx is int64 (N, top_k). No host sync.
    ``transform``: the model's logit post-processing, in the kernel's epilogue (``softcap.py``); exact ties
    of saturated soft-caps go to the lower id in the top-K, as ``topk.topk_lower_id``.
    ``impl`` (default ``blocks.stats_impl``): "fused" (the GEMM inside the statistics kernel) or "two_pass"
    (per chunk of ``blocks.stats_chunk`` rows, ``matmul.py`` writes fp32 logits, then the same kernel reads
    them: a C x V scratch and 8 V bytes of traffic per row, but the GEMM runs in plain 128-row tiles with
    no epilogue beside it) or "cuda" (the same chunks from a cuBLAS GEMM, read by the compiled ``dopd::row_stats``
    op: ``ext_stats.py``). All give the same results; which is faster is for a GPU benchmark to say.
    """
    n, h = hidden.shape
    blocks = blocks_for(hidden.device)
    impl = impl or blocks.stats_impl
    if impl not in ("fused", "two_pass", "cuda"):
        raise ValueError(f"impl must be 'fused', 'two_pass' or 'cuda', got {impl!r}")
    if impl == "cuda":  # cuBLAS GEMM + the compiled row_stats op (ext_stats.py)
        from .ext_stats import ext_linear_stats

        return ext_linear_stats(hidden, weight, bias, targets, vocab=vocab, inv_tau=inv_tau, top_k=top_k,
                                chunk=blocks.stats_chunk, transform=transform)
    hidden = hidden.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    block_v, block_n = blocks.stats_v, blocks.topk_n if top_k else blocks.stats_n
    rows_per_launch = n if impl == "fused" else min(n, blocks.stats_chunk)
    n_blocks = triton.cdiv(max(rows_per_launch, 1), block_n)
    v_blocks = triton.cdiv(vocab, block_v)
    if n_splits is None:  # enough programs for ~2 waves on the GPU; 2 splits under the interpreter (tests the merge)
        n_splits = triton.cdiv(264, n_blocks) if blocks.gpu else 2
    n_splits = max(1, min(n_splits, v_blocks))
    v_per_split = triton.cdiv(v_blocks, n_splits) * block_v
    n_splits = triton.cdiv(vocab, v_per_split)  # no empty split
    # Candidate slots per (row, split): never more than the split can fill (then no cut is ever needed),
    # in powers of two so that the kernel is not recompiled for every split width.
    cap = min(list_capacity(top_k, block_v), next_pow2(v_per_split + block_v)) if top_k else 1
    # Cut passes read (block_n, chunk) list entries at a time: ~16 keys per thread on the GPU.
    chunk = min(cap, max(16, blocks.topk_chunk_keys // block_n)) if top_k else 1
    f32 = dict(dtype=torch.float32, device=hidden.device)
    run_max = torch.empty(n, n_splits, **f32)
    run_sum = torch.empty(n, n_splits, **f32)
    tgt = torch.empty(n, n_splits, **f32)
    # Candidate lists for one launch's rows (all N when fused, one chunk when two-pass), reused per chunk.
    cand_vals = torch.empty(rows_per_launch, n_splits, cap, **f32)
    cand_ids = torch.empty(rows_per_launch, n_splits, cap, dtype=torch.int32, device=hidden.device)
    count = torch.zeros(rows_per_launch, n_splits, dtype=torch.int32, device=hidden.device)
    topk_vals = torch.empty(n, top_k, **f32)
    topk_idx = torch.empty(n, top_k, dtype=torch.int64, device=hidden.device)
    meta = dict(TOPK=bool(top_k), BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=blocks.stats_h, KB=max(top_k, 1),
                CAP=cap, CH=chunk, num_warps=blocks.num_warps, **dot_args(dot_dtype(hidden, weight, gpu=blocks.gpu)))

    def launch(src: torch.Tensor, stride: int, start: int, rows: int, tf: tuple, with_bias: bool,
               from_logits: bool) -> None:
        sl = slice(start, start + rows)
        _stats_kernel[(triton.cdiv(rows, block_n), n_splits)](
            src, weight, bias if with_bias else weight, targets[sl], run_max[sl], run_sum[sl], tgt[sl],
            cand_vals, cand_ids, count, rows, vocab, h, v_per_split, n_splits, stride,
            weight.stride(0), float(tf.pre), float(tf.post), HAS_BIAS=with_bias, SOFTCAP=tf.softcap,
            FROM_LOGITS=from_logits, **meta)
        if top_k:
            # After the kernel's last cut each (row, split) holds <= K keys in its first slots.
            kept = min(top_k, cap)
            live = torch.arange(kept, device=hidden.device) < count[:rows, :, None]
            keys = encode_keys(cand_vals[:rows, :, :kept], cand_ids[:rows, :, :kept]).masked_fill_(~live, -(2**63))
            topk_vals[sl], topk_idx[sl] = decode_keys(torch.topk(keys.reshape(rows, -1), top_k, dim=1).values)

    tf = kernel_transform(transform, inv_tau)
    if n and impl == "fused":
        launch(hidden, hidden.stride(0), 0, n, tf, bias is not None, False)
    elif n:
        # The GEMM's epilogue applies the transform, so the stored logits are final (any reader of them
        # needs no transform); the statistics kernel then runs its identity variant on them.
        logits = torch.empty(rows_per_launch, vocab, **f32)
        total = torch.full((1,), n, dtype=torch.int32, device=hidden.device)  # device-side row count
        w_t = weight[:vocab].T
        b = None if bias is None else bias[:vocab]
        for start in range(0, n, rows_per_launch):
            rows = min(rows_per_launch, n - start)
            matmul_into(logits[:rows], hidden[start:start + rows], w_t, blocks=blocks, count=total, row0=start,
                        limit="m", bias=b, transform=tf)
            launch(logits, logits.stride(0), start, rows, FINAL, False, True)
    lse = torch.logsumexp(run_max + run_sum.log(), dim=1)
    out = LinearStats(lse=lse, target_logit=tgt.sum(1))
    if top_k:
        out.topk_vals, out.topk_idx = topk_vals, topk_idx
    return out
