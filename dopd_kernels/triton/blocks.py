"""Tile sizes of the Triton kernels, chosen per device.

All block sizes are powers of two and every ``tl.dot`` operand dimension is >= 16, so the same
kernels compile for real GPUs and run under Triton's interpreter (``TRITON_INTERPRET=1``), where
small tiles keep the Python-level emulation fast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton.language as tl

_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@dataclass(frozen=True)
class Blocks:
    """Tiles: stats (token x vocab x hidden), statistics pass "fused" | "two_pass" | "cuda" (cuBLAS + the
    compiled row_stats op) and the two-pass / cuda chunk
    (rows), stats token block with top-K, keys per top-K compaction pass
    (token block x list chunk),
    matmul (m x n x k), row sweeps (vocab), top-K gather/scatter tiles (ids x hidden), warps; and ``gpu``:
    the launches are compiled for a GPU (tensor-core operand dtypes, vocabulary splits that fill the SMs),
    not interpreted. The launcher reads device decisions from here only, so that a test can record the
    GPU launch set with CPU tensors (tests/test_triton_compile.py)."""

    stats_n: int
    stats_v: int
    stats_h: int
    stats_impl: str
    stats_chunk: int
    topk_n: int
    topk_chunk_keys: int
    mm_m: int
    mm_n: int
    mm_k: int
    row_v: int
    gather_k: int
    gather_h: int
    num_warps: int
    num_stages: int
    gpu: bool


#: H100/H200-class tiles (bf16 tl.dot, fp32 accumulators); not autotuned yet (no GPU in the build sessions).
#: wgmma use for sm_90 is checked by tests/test_triton_compile.py. ptxas (CUDA 12.9, sm_90a, 8 warps, the
#: launcher's 16-divisibility, 2026-11-28) for the statistics kernel: without top-K, 128 rows: 194
#: registers, no spills. With the top-K candidate list (K = 128): 128 rows spill 4.8 KB per thread (1.4 KB
#: of it without the cut code, i.e. in the per-tile append), 64 rows 1.3 KB (~0.24 KB per-tile). Hence
#: topk_n = 64 until a GPU says otherwise (bench/gpu_check.sh times the statistics pass with and without
#: top-K); 64 rows is also the smallest wgmma tile (32 rows falls back to mma.sync).
#: stats_impl: "fused" (the issue's design) until a GPU measures "two_pass" (cost model: function.py).
GPU_BLOCKS = Blocks(stats_n=128, stats_v=128, stats_h=64, stats_impl="fused", stats_chunk=512, topk_n=64,
                    topk_chunk_keys=4096, mm_m=128, mm_n=128, mm_k=64, row_v=2048, gather_k=32, gather_h=256,
                    num_warps=8, num_stages=3, gpu=True)
#: Interpreter tiles: the smallest legal tl.dot tiles, so ragged test shapes hit every mask.
INTERPRETER_BLOCKS = Blocks(stats_n=16, stats_v=16, stats_h=16, stats_impl="fused", stats_chunk=32, topk_n=16,
                            topk_chunk_keys=1024, mm_m=16, mm_n=16, mm_k=16, row_v=16, gather_k=16, gather_h=16,
                            num_warps=4, num_stages=1, gpu=False)


def blocks_for(device: torch.device) -> Blocks:
    """GPU tiles on CUDA, interpreter tiles on the CPU."""
    return GPU_BLOCKS if device.type == "cuda" else INTERPRETER_BLOCKS


def next_pow2(x: int) -> int:
    """Smallest power of two >= x (>= 1)."""
    return 1 << max(0, (int(x) - 1).bit_length())


def dot_dtype(*tensors: torch.Tensor, gpu: bool) -> torch.dtype:
    """Operand dtype of tl.dot: bf16/fp16 when every tensor is that half type, else fp32 (IEEE).

    Under the interpreter (``gpu`` False) bf16 becomes fp32: its numpy ``tl.dot`` mishandles bf16 operands, and
    upcasting bf16 to fp32 is exact, so the products match the tensor-core ones up to summation order. fp16
    stays fp16 there (numpy multiplies fp16 operands exactly into its fp32 result, as the tensor cores do),
    so the interpreter tests see the fp16 rounding of operands that are converted in the kernel.
    """
    dtypes = {t.dtype for t in tensors}
    if dtypes == {torch.bfloat16}:
        return torch.bfloat16 if gpu else torch.float32
    if dtypes == {torch.float16}:
        return torch.float16
    return torch.float32


def dot_args(dtype: torch.dtype) -> dict:
    """The kernels' tl.dot constexprs for operand ``dtype`` (from ``dot_dtype``): DOT_DTYPE, and IEEE for
    fp32 operands (exact fp32 products, not TF32)."""
    return {"DOT_DTYPE": _TL_DTYPES[dtype], "IEEE": dtype == torch.float32}
