"""Streaming top-K for the statistics kernel: a per-row candidate list with a rising threshold.

Order: a logit z at vocabulary id v ranks by (z up, v down), -inf logits included; as one int64,
``key = ordered(z) << 32 | (NO_ID - v)`` with ``ordered`` the order-preserving int32 image of the float
bits (``pack``), so keys are unique per row and the top-K is the K largest keys. -0.0 is folded into +0.0
first (``canonical``), so float compares and key compares agree.

Per (row, vocabulary split) the kernel owns CAP slots of a global candidate list (fp32 values and int32
ids, the layout of the logit tile, so the hot path never builds an int64 tile) and a threshold key: the
list holds every key of the row's top-KB so far, and a new key can only enter that top-KB if it beats the
threshold.
- ``append``: per tile, a float compare per logit against the threshold (value, id); the keys above it go
  to the list at ``count + cumsum`` (a masked store; no sort, no per-key loop).
- ``compact``: when a row of the block could overflow on the next tile (and once at the end of the
  sweep), every row holding >= KB keys is cut to its KB largest and its threshold becomes the KB-th
  largest key: an exact select by bisection, first over the 32 value bits (from the old threshold up),
  then (only when some row has ties at that value) over the 32 id bits; each step is one counting pass
  over the live part of the list. The kept keys move to the front, in order.
For logits in random vocabulary order the threshold after a cut at column j is the KB-th largest of j
columns, so about KB x (columns since) / j keys enter afterwards: with CAP - BLOCK_V - KB free slots that is
about log(V / CAP) / log(1 + free / KB) cuts per split (~6 at V / 2 = 75968, KB = 128, CAP = 512). Per
tile the cost is a few compares and a row scan over the tile (~1.6K instructions per thread at 64 x 128
tiles, not overlapped with the MMA; the scan also costs registers, see blocks.py); the cuts do not grow
with the tile count. The torch epilogue takes the top-K over the <= KB keys per (row, split) left by the last cut.
"""

import triton
import triton.language as tl

INT64_MIN = tl.constexpr(-(2**63))
NO_ID = tl.constexpr(2**31 - 1)
NO_ID_HOST = 2**31 - 1


def list_capacity(kb: int, block_v: int) -> int:
    """Slots per (row, split): room for KB kept keys, one tile of appends and as much again as slack."""
    cap = 2 * (kb + block_v)
    return 1 << (cap - 1).bit_length()


@triton.jit
def canonical(z):
    """Fold -0.0 into +0.0 (IEEE: -0 + 0 = +0), so that float order and key order agree."""
    return z + 0.0


@triton.jit
def pack(vals, ids):
    """fp32 values and int32 ids (same shape) -> int64 keys ordered by (value up, id down)."""
    bits = vals.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (-ids + NO_ID).to(tl.int64)


@triton.jit
def unpack(keys):
    """int64 keys of real (value, id) pairs -> (fp32 values, int32 ids); the inverse of ``pack``."""
    ordered = (keys >> 32).to(tl.int32)
    bits = tl.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True), -(keys & 0xFFFFFFFF).to(tl.int32) + NO_ID


@triton.jit
def above(z, cols, t_val, t_id):
    """(R, C) mask: keys (z, cols) ranked above each row's threshold key (t_val, t_id) (R,)."""
    return (z > t_val[:, None]) | ((z == t_val[:, None]) & (cols[None, :] < t_id[:, None]))


@triton.jit
def append(vals, ids, take, v_base, i_base, count):
    """Store (vals, ids) where ``take`` (R, C) after each row's ``count`` entries of its list at v_base/i_base."""
    taken = take.to(tl.int32)
    pos = count[:, None] + tl.cumsum(taken, axis=1) - 1
    tl.store(v_base[:, None] + pos, vals, mask=take)
    tl.store(i_base[:, None] + pos, ids, mask=take)
    return count + tl.sum(taken, axis=1)


@triton.jit
def _load_keys(v_base, i_base, count, c0, CH: tl.constexpr):
    """List slots [c0, c0 + CH) per row: (keys, live, values, ids); keys are INT64_MIN past each row's count."""
    slots = c0 + tl.arange(0, CH)
    live = slots[None, :] < count[:, None]
    vals = tl.load(v_base[:, None] + slots[None, :], mask=live, other=0.0)
    ids = tl.load(i_base[:, None] + slots[None, :], mask=live, other=0)
    return tl.where(live, pack(vals, ids), INT64_MIN), live, vals, ids


@triton.jit
def _count_at_least(v_base, i_base, count, thr, HI_ONLY: tl.constexpr, R: tl.constexpr, CH: tl.constexpr):
    """Per row: how many listed keys are >= thr (R,) (comparing the value half only if HI_ONLY)."""
    n = tl.zeros([R], dtype=tl.int32)
    for c0 in range(0, tl.max(count, axis=0), CH):
        keys, live, _, _ = _load_keys(v_base, i_base, count, c0, CH)
        if HI_ONLY:
            keys = keys >> 32
        n += tl.sum((live & (keys >= thr[:, None])).to(tl.int32), axis=1)
    return n


@triton.jit
def _bisect(v_base, i_base, count, lo, hi, KB: tl.constexpr, HI_ONLY: tl.constexpr, R: tl.constexpr,
            CH: tl.constexpr):
    """Per row: the largest t in [lo, hi] with count(keys >= t) >= KB (given that it holds at lo)."""
    while tl.max((lo < hi).to(tl.int32), axis=0) > 0:
        mid = (lo >> 1) + (hi >> 1) + ((lo | hi) & 1)  # ceil((lo + hi) / 2) without overflow
        ok = _count_at_least(v_base, i_base, count, mid, HI_ONLY, R, CH) >= KB
        busy = lo < hi
        lo = tl.where(busy & ok, mid, lo)
        hi = tl.where(busy & (ok == 0), mid - 1, hi)
    return lo


@triton.jit
def compact(v_base, i_base, count, t_val, t_id, KB: tl.constexpr, R: tl.constexpr, CH: tl.constexpr):
    """Cut each row's list to its KB largest keys (at the front, in list order).

    ``(t_val, t_id)`` is the current threshold; returns the new one and the new counts. Rows holding
    fewer than KB keys (never cut: a cut leaves exactly KB) are left alone and keep admitting every key.
    Starts with a barrier that orders the program's appends before its reads. (Triton cannot keep it out
    of line: noinline functions take scalars only.)
    """
    tl.debug_barrier()
    need = count >= KB  # == KB: cut before and nothing entered since; its exact threshold is recomputed
    # Value half: the largest v with >= KB keys of value >= v (int64 arithmetic over the int32 range). The
    # current threshold's value is a lower bound: every listed key is at least the threshold.
    lo = pack(t_val, t_id) >> 32
    hi = tl.where(need, tl.full([R], 2**31 - 1, dtype=tl.int64), lo)
    v_t = _bisect(v_base, i_base, count, lo, hi, KB, True, R, CH)
    # Id half, only for rows with more than KB keys at value >= v_t (ties at v_t).
    lo = v_t << 32
    tied = need & (_count_at_least(v_base, i_base, count, lo, False, R, CH) > KB)
    hi = tl.where(tied, lo | 0xFFFFFFFF, lo)
    thr = _bisect(v_base, i_base, count, lo, hi, KB, False, R, CH)
    # Keep keys >= thr (exactly KB per cut row: keys are unique). A key only moves towards the front and a
    # chunk is read before anything is written over it (barrier), so the move is in place.
    kept = tl.zeros([R], dtype=tl.int32)
    for c0 in range(0, tl.max(count, axis=0), CH):
        keys, live, vals, ids = _load_keys(v_base, i_base, count, c0, CH)
        tl.debug_barrier()
        kept = append(vals, ids, need[:, None] & live & (keys >= thr[:, None]), v_base, i_base, kept)
    tl.debug_barrier()
    new_val, new_id = unpack(thr)
    return tl.where(need, new_val, t_val), tl.where(need, new_id, t_id), tl.where(need, kept, count)
