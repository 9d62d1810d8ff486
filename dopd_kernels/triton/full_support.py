"""Kernel 2: losses and logit gradients of the rows that need the student's full softmax.

Rows: full-support routes (JS / rkl / fkl / generalized JSD against the teacher or the privileged self),
sampled-support routes (single-sample reverse-KL policy gradient) and, when ``ce_weight`` > 0, every
valid row (hard-label CE). They are sorted to the front on the device; a device-side count tells the
kernels where they end, so chunks past it launch but do no work (no host sync): their programs return
before reading or writing anything, the fp32 d W accumulator included.

Per chunk of C rows (``matmul.py`` for the three GEMM-shaped steps, ``_rows_kernel`` for the rest):
    z_s = T_s(h_s W_s^T + b_s)/tau, z_src likewise (C x V fp32 scratch, reused: O(C x V), never N x V; each
        model's transform T in the GEMM's epilogue, ``softcap.py``);
    _rows_kernel, one program per row, three sweeps over the row: student lse (online); the divergence
        value from the saved source lse; the logit gradient written in place over z_s (after a barrier:
        the row's scalar reads of z_s[y] and z_s[yh] come first in every warp), chained through T_s there
        (scale / tau, and the soft-cap's slope 1 - tanh^2 read off z_s itself), so dz is w.r.t. h W^T + b;
    d h_s[rows] = dz @ W_s ; d W_s += dz^T h_s ; d b_s += sum(dz)       (fp32 accumulators; the GEMM
        operands are bf16 for bf16 models, fp16 with a per-chunk power-of-two scale for fp16 models).
Why materialize a C x V chunk instead of recomputing logit tiles in the gradient pass: the gradient of
JS (and of rkl) needs a per-row sum over the whole vocabulary before any dz tile is known, so a fully
fused scheme recomputes z_s and z_src two or three times and must reduce dW across token blocks with
atomics. The chunk costs exactly the 4 GEMMs of the floor (z_s, z_src, dh, dW) plus ~10 memory sweeps
of C x V fp32 (see function.py for the numbers).
FLOPs per row: 2 V (Hs + H_src) forward + 4 V Hs backward. Bytes per row: ~40 V (scratch sweeps).

The tl code restates ``divergences.divergence_and_grad`` (value and dz = s (g - <s, g>) closed forms for
rkl, fkl, jsd) and ``divergences.sampled_pg`` (dz = c (onehot(y) - s), c = l_S - l_src).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ..transform import IDENTITY, LogitTransform
from .blocks import Blocks
from .matmul import matmul_into
from .softcap import kernel_transform, softcap_slope

#: Per-row kind codes of _rows_kernel (route table -> code via RowPlan.kind_table).
KIND_NONE, KIND_RKL, KIND_FKL, KIND_JSD, KIND_SAMPLED = 0, 1, 2, 3, 4
KIND_CODES = {"rkl": KIND_RKL, "fkl": KIND_FKL, "jsd": KIND_JSD}


@triton.jit
def _rows_kernel(zs_ptr, zt_ptr, zp_ptr, stride_z, count_ptr, row0, rows_ptr,
                 y_ptr, yh_ptr, kind_ptr, rw_ptr, use_t_ptr, lse_t_ptr, lse_p_ptr, lsrc_ptr, red_ptr,
                 loss_ptr, slp_ptr, amax_ptr, vocab, grad_scale, inv_post, beta, log_beta, log_1m_beta, ce_weight,
                 SOFTCAP: tl.constexpr, HAS_T: tl.constexpr, HAS_P: tl.constexpr, HAS_RKL: tl.constexpr,
                 HAS_FKL: tl.constexpr,
                 HAS_JSD: tl.constexpr, HAS_SAMPLED: tl.constexpr, HAS_CE: tl.constexpr,
                 WANT_GRAD: tl.constexpr, GRAD_AMAX: tl.constexpr, BLOCK_V: tl.constexpr):
    r = tl.program_id(0)
    live = tl.load(count_ptr) - row0
    if r < live:
        tok = tl.load(rows_ptr + r)
        y = tl.load(y_ptr + tok)
        kind = tl.load(kind_ptr + tok)
        rw = tl.load(rw_ptr + tok)
        row_off = r.to(tl.int64) * stride_z  # chunk x V passes 2^31 at chunk_size >= 14135, V = 151936
        zs_row = zs_ptr + row_off
        # Sweep 1: the student's log-sum-exp (online; a tile of only -inf logits, from a -inf bias, keeps the
        # max at -inf and is shifted by 0 so that no exp(-inf - -inf) enters the sum).
        run_max = float("-inf")
        run_sum = 0.0
        for v0 in range(0, vocab, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            z = tl.load(zs_row + cols, mask=cols < vocab, other=float("-inf"))
            new_max = tl.maximum(run_max, tl.max(z, axis=0))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(z - shift), axis=0)
            run_max = new_max
        lse_s = run_max + tl.log(run_sum)
        ls_y = tl.load(zs_row + y) - lse_s
        value = 0.0
        kl = 0.0  # the per-row sum the rkl / jsd gradients need: KL(S||src) or KL(S||M)
        c = 0.0
        if HAS_SAMPLED:
            c = ls_y - tl.load(lsrc_ptr + tok)
            value = tl.where(kind == 4, c * ls_y, value)
        is_full = (kind >= 1) & (kind <= 3)
        if HAS_T:
            lse_t = tl.load(lse_t_ptr + tok)
        else:
            lse_t = 0.0
        if HAS_P:
            lse_p = tl.load(lse_p_ptr + tok)
        else:
            lse_p = 0.0
        use_t = tl.load(use_t_ptr + tok) != 0
        # Sweep 2: divergence value against the source, rebuilt from its saved lse. Compiled only when some
        # full-support route exists (then a teacher or a self source buffer is there to read).
        if HAS_RKL or HAS_FKL or HAS_JSD:
            if is_full:
                acc_a = tl.zeros([BLOCK_V], dtype=tl.float32)
                acc_b = tl.zeros([BLOCK_V], dtype=tl.float32)
                for v0 in range(0, vocab, BLOCK_V):
                    cols = v0 + tl.arange(0, BLOCK_V)
                    ok = cols < vocab
                    ls = tl.load(zs_row + cols, mask=ok, other=float("-inf")) - lse_s
                    lt = _source_logprob(zt_ptr, zp_ptr, row_off + cols, ok, use_t, lse_t, lse_p, HAS_T, HAS_P)
                    s = tl.exp(ls)
                    t = tl.exp(lt)
                    if HAS_RKL:
                        acc_a += tl.where((kind == 1) & (s > 0), s * (ls - lt), 0.0)
                    if HAS_FKL:
                        acc_a += tl.where((kind == 2) & (t > 0), t * (lt - ls), 0.0)
                    if HAS_JSD:
                        lm = _log_mixture(ls, lt, log_beta, log_1m_beta)
                        acc_a += tl.where((kind == 3) & (s > 0), s * (ls - lm), 0.0)
                        acc_b += tl.where((kind == 3) & (t > 0), t * (lt - lm), 0.0)
                sum_a = tl.sum(acc_a, axis=0)
                sum_b = tl.sum(acc_b, axis=0)
                kl = sum_a
                value = tl.where(kind == 3, beta * sum_b + (1.0 - beta) * sum_a, sum_a)
        loss = rw * value
        yh = 0
        if HAS_CE:
            yh = tl.load(yh_ptr + tok)
            loss -= ce_weight * (tl.load(zs_row + yh) - lse_s)
        tl.store(loss_ptr + tok, tl.load(loss_ptr + tok) + loss)
        tl.store(slp_ptr + tok, ls_y)
        # Sweep 3: dz = red_w * scale / tau * (rw * dD/dz + ce * (s - onehot(yh))) [* the soft-cap's slope],
        # the gradient w.r.t. the raw logits h W^T + b (grad_scale = scale / tau), written over z_s.
        if WANT_GRAD:
            # The scalar reads of z_s[y] and z_s[yh] above must be done by every warp before any warp
            # overwrites its columns below (the sweeps' reductions do not order them on a sampled row).
            tl.debug_barrier()
            scale = tl.load(red_ptr + tok) * grad_scale
            g_max = tl.zeros([BLOCK_V], dtype=tl.float32)
            for v0 in range(0, vocab, BLOCK_V):
                cols = v0 + tl.arange(0, BLOCK_V)
                ok = cols < vocab
                z = tl.load(zs_row + cols, mask=ok, other=float("-inf"))
                ls = z - lse_s
                s = tl.exp(ls)
                g = tl.zeros([BLOCK_V], dtype=tl.float32)
                if HAS_RKL or HAS_FKL or HAS_JSD:
                    if is_full:
                        lt = _source_logprob(zt_ptr, zp_ptr, row_off + cols, ok, use_t, lse_t, lse_p, HAS_T, HAS_P)
                        if HAS_RKL:
                            g += tl.where((kind == 1) & (s > 0), s * (ls - lt - kl), 0.0)
                        if HAS_FKL:
                            g += tl.where(kind == 2, s - tl.exp(lt), 0.0)
                        if HAS_JSD:
                            lm = _log_mixture(ls, lt, log_beta, log_1m_beta)
                            g += tl.where((kind == 3) & (s > 0), (1.0 - beta) * s * (ls - lm - kl), 0.0)
                if HAS_SAMPLED:
                    g += tl.where(kind == 4, c * (tl.where(cols == y, 1.0, 0.0) - s), 0.0)
                g = g * rw
                if HAS_CE:
                    g += ce_weight * (s - tl.where(cols == yh, 1.0, 0.0))
                g = g * scale
                if SOFTCAP:  # d cap tanh(x) / dx = 1 - tanh^2, tanh = z / post (softcap.py); 0 at -inf
                    g = g * softcap_slope(z, inv_post)
                if GRAD_AMAX:
                    g_max = tl.maximum(g_max, tl.where(ok, tl.abs(g), 0.0))
                tl.store(zs_row + cols, g, mask=ok)
            if GRAD_AMAX:  # the chunk's max |dz|, for the power-of-two scale of fp16 GEMM operands (matmul.py)
                tl.atomic_max(amax_ptr, tl.max(g_max, axis=0))


@triton.jit
def _bias_grad_kernel(dz_ptr, db_ptr, count_ptr, row0, rows, vocab, stride_z,
                      BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """d b[cols] += sum of dz over the chunk's live rows; a chunk with no live rows reads and writes nothing."""
    live = tl.minimum(tl.maximum(tl.load(count_ptr) - row0, 0), rows)
    if live <= 0:
        return
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < vocab
    acc = tl.zeros([BLOCK_V], dtype=tl.float32)
    for r0 in range(0, live, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        tile = tl.load(dz_ptr + rr.to(tl.int64)[:, None] * stride_z + cols[None, :],
                       mask=(rr < live)[:, None] & col_ok[None, :], other=0.0)
        acc += tl.sum(tile, axis=0)
    tl.store(db_ptr + cols, tl.load(db_ptr + cols, mask=col_ok, other=0.0) + acc, mask=col_ok)


@triton.jit
def _source_logprob(zt_ptr, zp_ptr, offs, ok, use_t, lse_t, lse_p, HAS_T: tl.constexpr, HAS_P: tl.constexpr):
    """log-probs of the row's source over one tile (teacher or privileged self), -inf past the vocabulary."""
    if HAS_T:
        lt_t = tl.load(zt_ptr + offs, mask=ok, other=float("-inf")) - lse_t
    if HAS_P:
        lt_p = tl.load(zp_ptr + offs, mask=ok, other=float("-inf")) - lse_p
    if HAS_T and HAS_P:
        out = tl.where(use_t, lt_t, lt_p)
    elif HAS_T:
        out = lt_t
    elif HAS_P:
        out = lt_p
    else:  # no full-support source: never called (the sweeps are compiled out), but must still compile
        out = tl.full(offs.shape, float("-inf"), tl.float32)
    return out


@triton.jit
def _log_mixture(ls, lt, log_beta, log_1m_beta):
    """log(beta t + (1 - beta) s), as divergences._log_mixture; -inf where both are -inf."""
    a = lt + log_beta
    b = ls + log_1m_beta
    hi = tl.maximum(a, b)
    safe = tl.where(hi == float("-inf"), 0.0, hi)
    return safe + tl.log(tl.exp(a - safe) + tl.exp(b - safe))


@dataclass
class Model:
    """One model's rows for the chunks: hidden (N, H) and projection weight (>= V, H), bias or None, and the
    post-processing of its logits."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    transform: LogitTransform = IDENTITY


def student_full_rows(*, order: torch.Tensor, count: torch.Tensor, student: Model, teacher: Optional[Model],
                      self_model: Optional[Model], per_row: dict[str, torch.Tensor], vocab: int, inv_tau: float,
                      jsd_beta: float, ce_weight: float, flags: dict[str, bool], chunk: int, blocks: Blocks,
                      per_token: torch.Tensor, student_logprob: torch.Tensor,
                      grads: dict[str, Optional[torch.Tensor]]) -> None:
    """Run the full-support chunks. ``order``: (N,) token ids, rows needing the full softmax first;
    ``count``: (1,) int32 device count of those rows. ``per_row``: (N,) tensors y, yh, kind (int32),
    rw (route weight), use_t (int32), lse_t, lse_p, lsrc (source target log-prob), red (reduction weight).
    Writes per_token (adds), student_logprob (sets) and accumulates grads["hidden"|"weight"|"bias"] (fp32).

    Every chunk is launched (no host sync); in a chunk past the count every program returns at once, so it
    reads and writes nothing of the fp32 d W / d b accumulators (only the O(C x H) gathers and the d h
    zero-fill of the launcher remain).
    """
    n = order.numel()
    device = student.hidden.device
    c_max = max(1, min(chunk, n))
    zs = torch.empty(c_max, vocab, dtype=torch.float32, device=device)
    zt = torch.empty_like(zs) if teacher is not None else None
    zp = torch.empty_like(zs) if self_model is not None else None
    w_s = student.weight[:vocab]
    want_grad = any(g is not None for g in grads.values())
    half = student.weight.dtype if student.weight.dtype in (torch.bfloat16, torch.float16) else None
    # fp16 d h / d W operands: per chunk, the rows kernel records max |dz| (one slot per chunk, zeroed once;
    # 16 bytes apart, so that every slot has the alignment the kernels are specialized for) and the GEMMs
    # scale dz by a power of two from it before the fp16 conversion (matmul.py).
    amax = torch.zeros(triton.cdiv(n, c_max), 4, dtype=torch.float32, device=device) \
        if half == torch.float16 and want_grad else None
    tf_s = kernel_transform(student.transform, inv_tau)
    for i, start in enumerate(range(0, n, c_max)):
        rows = order[start:start + c_max]
        c = rows.numel()
        chunk_amax = None if amax is None else amax[i, :1]
        h_c = student.hidden.index_select(0, rows)
        matmul_into(zs[:c], h_c, w_s.T, blocks=blocks, count=count, row0=start, limit="m",
                    bias=None if student.bias is None else student.bias[:vocab], transform=tf_s)
        for model, buf in ((teacher, zt), (self_model, zp)):
            if model is not None:
                matmul_into(buf[:c], model.hidden.index_select(0, rows), model.weight[:vocab].T, blocks=blocks,
                            count=count, row0=start, limit="m",
                            bias=None if model.bias is None else model.bias[:vocab],
                            transform=kernel_transform(model.transform, inv_tau))
        _rows_kernel[(c,)](
            zs, zt if zt is not None else zs, zp if zp is not None else zs, zs.stride(0), count, start, rows,
            per_row["y"], per_row["yh"], per_row["kind"], per_row["rw"], per_row["use_t"], per_row["lse_t"],
            per_row["lse_p"], per_row["lsrc"], per_row["red"], per_token, student_logprob,
            chunk_amax if chunk_amax is not None else zs,
            vocab, float(tf_s.grad_scale), float(tf_s.inv_post), float(jsd_beta), math.log(jsd_beta),
            math.log1p(-jsd_beta), float(ce_weight),
            SOFTCAP=tf_s.softcap and want_grad,  # only the gradient sweep reads it: no variant without one
            HAS_T=teacher is not None, HAS_P=self_model is not None, HAS_RKL=flags["rkl"], HAS_FKL=flags["fkl"],
            HAS_JSD=flags["jsd"], HAS_SAMPLED=flags["sampled"], HAS_CE=ce_weight > 0, WANT_GRAD=want_grad,
            GRAD_AMAX=chunk_amax is not None, BLOCK_V=blocks.row_v, num_warps=blocks.num_warps,
        )
        if not want_grad:
            continue
        dz = zs[:c]
        if grads["hidden"] is not None:
            d_h = torch.zeros(c, w_s.shape[1], dtype=torch.float32, device=device)
            matmul_into(d_h, dz, w_s, blocks=blocks, count=count, row0=start, limit="m", operand_dtype=half,
                        a_amax=chunk_amax)
            grads["hidden"].index_add_(0, rows, d_h)
        if grads["weight"] is not None:
            matmul_into(grads["weight"], dz.T, h_c, blocks=blocks, count=count, row0=start, limit="k",
                        accumulate=True, operand_dtype=half, a_amax=chunk_amax)
        if grads["bias"] is not None:
            _bias_grad_kernel[(triton.cdiv(vocab, blocks.mm_n),)](
                dz, grads["bias"], count, start, c, vocab, dz.stride(0), BLOCK_R=blocks.mm_m, BLOCK_V=blocks.mm_n,
                num_warps=blocks.num_warps)
