"""Bitonic sorting network along the last axis of a (ROWS, M) tile, M a power of two, for the streaming top-K.

Built from reshape / permute / split / join only, so it compiles like ``tl.sort`` on GPUs and runs fast
under Triton's interpreter (whose ``tl.topk`` emulates every compare-and-swap with a Python reduction).

``merge_topk(buf, tile)``: ``buf`` sorted descending holds the best M keys so far; the tile is sorted
ascending, ``max(buf, tile)`` is then a bitonic sequence holding the best M keys of the union (the
bitonic split), and one bitonic merge sorts it descending again. Cost per tile: log2(M)(log2(M)+3)/2
compare-and-swap stages over ROWS x M keys.
"""

import triton
import triton.language as tl


@triton.jit
def _cas(x, ROWS: tl.constexpr, M: tl.constexpr, J: tl.constexpr, S: tl.constexpr, DESC: tl.constexpr):
    """One compare-and-swap stage at distance 2**J. Pair direction: bit S of the index (S >= log2 M: uniform)."""
    D: tl.constexpr = 1 << J
    A: tl.constexpr = M // (2 * D)
    y = tl.permute(tl.reshape(x, [ROWS, A, 2, D]), [0, 1, 3, 2])
    lo, hi = tl.split(y)
    a = tl.arange(0, A)
    if S - J - 1 < 30:
        flip = ((a >> (S - J - 1)) & 1) == 1
    else:
        flip = a < 0
    desc = (flip != DESC)[None, :, None]
    small = tl.minimum(lo, hi)
    big = tl.maximum(lo, hi)
    new_lo = tl.where(desc, big, small)
    new_hi = tl.where(desc, small, big)
    y = tl.permute(tl.join(new_lo, new_hi), [0, 1, 3, 2])
    return tl.reshape(y, [ROWS, M])


@triton.jit
def bitonic_sort(x, ROWS: tl.constexpr, M: tl.constexpr, LOG_M: tl.constexpr, DESC: tl.constexpr):
    """Sort each row of x (ROWS, M) along the last axis; M = 2**LOG_M."""
    for s in tl.static_range(1, LOG_M + 1):
        for jj in tl.static_range(0, s):
            x = _cas(x, ROWS, M, s - 1 - jj, s, DESC)
    return x


@triton.jit
def bitonic_merge(x, ROWS: tl.constexpr, M: tl.constexpr, LOG_M: tl.constexpr, DESC: tl.constexpr):
    """Sort rows that are bitonic sequences (log2 M uniform stages)."""
    for jj in tl.static_range(0, LOG_M):
        x = _cas(x, ROWS, M, LOG_M - 1 - jj, LOG_M + 30, DESC)
    return x


@triton.jit
def merge_topk(buf, tile, ROWS: tl.constexpr, M: tl.constexpr, LOG_M: tl.constexpr):
    """The M largest keys per row of ``buf`` (sorted descending) and ``tile`` (any order), sorted descending."""
    tile = bitonic_sort(tile, ROWS, M, LOG_M, False)
    return bitonic_merge(tl.maximum(buf, tile), ROWS, M, LOG_M, True)
