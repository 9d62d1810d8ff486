"""Tiled matmul with fp32 accumulation for the full-support chunks: C (+)= scale * (A @ B + bias).

Used three ways per chunk of C student-full rows (``full_support.py``):
    logits  z (C, V)  = T(h_chunk @ W^T + b) / tau      rows limited to the live rows of the chunk; T the
                                                        model's transform (``softcap.py`` epilogue)
    d hidden (C, Hs)  = dz @ W                          rows limited likewise
    d weight (V, Hs) += dz^T @ h_chunk                  reduction limited to the live rows; fp32 accumulator
"Live" rows come from a device-side count (rows past it skip their loads and stores, or the reduction
stops there), so launching every chunk needs no host sync and programs of empty chunks do no work: an
accumulating product whose reduction is empty (d W of a chunk with no live rows) returns before it reads
or writes its output tile (without that, each empty chunk would read and write the whole fp32 V x Hs d W).
Strides make the transposes free; offsets are int64 (V x H or C x V passes 2^31 at real sizes, e.g. a
256000 x 18432 head, or chunk_size >= 14135 at V = 151936).
fp16 operands: ``a_amax`` scales A by a power of two from its device-side max |A| (to ~2^14) before the
fp16 conversion and divides the fp32 result by it, so that small fp32 values (the logit gradients, which
carry the ~1/N reduction weight) do not flush to zero in fp16; bf16 has fp32's exponent range and needs no scale.
FLOPs: 2 M N K; bytes: M K + K N (+ M N, twice when accumulating).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .blocks import Blocks, dot_args, dot_dtype
from .softcap import KernelTransform, transform_logits

@triton.jit
def pow2_scale(amax):
    """2^(14 - floor(log2 amax)) as an exact power of two (from the float's exponent bits), so that
    amax * scale lies in [2^14, 2^15): fp16-representable with room to spare. Clamped to the normal fp32 range."""
    exp_bits = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF
    out_bits = tl.minimum(tl.maximum(268 - exp_bits, 1), 254)  # 127 + 14 - (exp_bits - 127), biased
    return (out_bits << 23).to(tl.float32, bitcast=True)


@triton.jit
def _mm_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, count_ptr, amax_ptr, row0, M, N, K,
               s_am, s_ak, s_bk, s_bn, s_cm, s_cn, pre, scale,
               LIMIT_M: tl.constexpr, LIMIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr,
               SOFTCAP: tl.constexpr, SCALE_A: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    live = tl.maximum(tl.load(count_ptr) - row0, 0)
    m_lim = tl.minimum(live, M) if LIMIT_M else M
    k_lim = tl.minimum(live, K) if LIMIT_K else K
    if LIMIT_M:
        if pid_m * BLOCK_M >= m_lim:  # a block of dead rows reads and writes nothing
            return
    if ACCUMULATE and not HAS_BIAS:
        if k_lim <= 0:  # an empty reduction adds nothing: skip even the read and write of C
            return
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < m_lim
    n_ok = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    a_scale = 1.0
    if SCALE_A:
        a_scale = pow2_scale(tl.load(amax_ptr))
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_lim, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < k_lim
        rk64 = rk.to(tl.int64)
        a = tl.load(a_ptr + rm64[:, None] * s_am + rk64[None, :] * s_ak, mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        b = tl.load(b_ptr + rk64[:, None] * s_bk + rn64[None, :] * s_bn, mask=k_ok[:, None] & n_ok[None, :],
                    other=0.0)
        if SCALE_A:
            a = a * a_scale
        if IEEE:
            acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision="ieee")
        else:
            acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc)
    if SCALE_A:
        acc = acc / a_scale
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    acc = transform_logits(acc, pre, scale, SOFTCAP)  # acc * scale, or scale * tanh(pre * acc) keeping -inf
    c_ptrs = c_ptr + rm64[:, None] * s_cm + rn64[None, :] * s_cn
    out_ok = m_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=out_ok, other=0.0)
    tl.store(c_ptrs, acc, mask=out_ok)


def matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, blocks: Blocks, count: torch.Tensor,
                row0: int, limit: str, bias: Optional[torch.Tensor] = None, scale: float = 1.0,
                accumulate: bool = False, operand_dtype: Optional[torch.dtype] = None,
                a_amax: Optional[torch.Tensor] = None, transform: Optional[KernelTransform] = None) -> None:
    """out (M, N) fp32 (+)= scale * (a @ b + bias), a (M, K) and b (K, N) any strides (views of transposes).

    ``transform`` (logits only, replaces ``scale``): a model's epilogue from ``softcap.kernel_transform``,
    out = post * tanh(pre * (a @ b + bias)) with -inf kept under a soft-cap, else post * (a @ b + bias).

    ``limit``: "m" (rows >= count - row0 are neither read nor written; blocks of such rows return at once)
    or "k" (the reduction stops at count - row0; with ``accumulate`` and no bias, nothing is read or written
    when it is empty). ``count``
    is a 1-element int tensor on the device. ``operand_dtype``: tl.dot operand dtype (default: from a and
    b; fp32 operands use IEEE fp32, not TF32; bf16 becomes fp32 under the interpreter, see blocks.dot_dtype).
    ``a_amax``: a 1-element fp32 device tensor >= max |a|; with fp16 operands A is scaled by a power of two
    from it before the conversion (ignored otherwise).
    """
    m, k = a.shape
    n = b.shape[1]
    ddt = operand_dtype or dot_dtype(a, b, gpu=blocks.gpu)
    if ddt == torch.bfloat16 and not blocks.gpu:
        ddt = torch.float32  # interpreter: see blocks.dot_dtype
    scale_a = a_amax is not None and ddt == torch.float16
    tf = transform or KernelTransform(False, 1.0, scale)
    grid = (triton.cdiv(m, blocks.mm_m), triton.cdiv(n, blocks.mm_n))
    _mm_kernel[grid](
        a, b, out, bias if bias is not None else out, count, a_amax if scale_a else out, row0, m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1), float(tf.pre),
        float(tf.post), LIMIT_M=limit == "m", LIMIT_K=limit == "k", HAS_BIAS=bias is not None,
        ACCUMULATE=accumulate, SOFTCAP=tf.softcap, SCALE_A=scale_a, **dot_args(ddt),
        BLOCK_M=blocks.mm_m, BLOCK_N=blocks.mm_n, BLOCK_K=blocks.mm_k,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )
