"""Tile sizes of the Triton kernels, chosen per device.

All block sizes are powers of two and every ``tl.dot`` operand dimension is >= 16, so the same
kernels compile for real GPUs and run under Triton's interpreter (``TRITON_INTERPRET=1``), where
small tiles keep the Python-level emulation fast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Blocks:
    """Tiles: stats (token x vocab x hidden), matmul (m x n x k), row sweeps (vocab), warps."""

    stats_n: int
    stats_v: int
    stats_h: int
    stats_topk_n: int
    mm_m: int
    mm_n: int
    mm_k: int
    row_v: int
    num_warps: int
    num_stages: int


#: H100/H200-class tiles (bf16 tl.dot, fp32 accumulators); not autotuned yet (no GPU in the build session).
#: stats_topk_n: the bitonic top-K merge is unrolled over a (stats_topk_n, 128) int64 tile; compiling the
#: statistics kernel for sm_90 (triton 3.9, no GPU needed) took 3.5 s at 16 rows and did not finish in
#: 200 s at 32 or 64 rows (2026-11-28), so 16 until a GPU session finds a faster top-K scheme.
GPU_BLOCKS = Blocks(stats_n=128, stats_v=128, stats_h=64, stats_topk_n=16, mm_m=128, mm_n=128, mm_k=64,
                    row_v=2048, num_warps=8, num_stages=3)
#: Interpreter tiles: the smallest legal tl.dot tiles, so ragged test shapes hit every mask.
INTERPRETER_BLOCKS = Blocks(stats_n=16, stats_v=16, stats_h=16, stats_topk_n=16, mm_m=16, mm_n=16, mm_k=16,
                            row_v=16, num_warps=4, num_stages=1)


def blocks_for(device: torch.device) -> Blocks:
    """GPU tiles on CUDA, interpreter tiles on the CPU."""
    return GPU_BLOCKS if device.type == "cuda" else INTERPRETER_BLOCKS


def next_pow2(x: int) -> int:
    """Smallest power of two >= x (>= 1)."""
    return 1 << max(0, (int(x) - 1).bit_length())


def dot_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Operand dtype of tl.dot: bf16/fp16 when every tensor is that half type, else fp32 (IEEE).

    Under the interpreter (CPU tensors) always fp32: its numpy ``tl.dot`` mishandles bf16 operands, and
    upcasting bf16/fp16 to fp32 is exact, so the products match the tensor-core ones up to summation order.
    """
    dtypes = {t.dtype for t in tensors}
    if tensors and tensors[0].device.type != "cuda":
        return torch.float32
    if dtypes == {torch.bfloat16}:
        return torch.bfloat16
    if dtypes == {torch.float16}:
        return torch.float16
    return torch.float32
