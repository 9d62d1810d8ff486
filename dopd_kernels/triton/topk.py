"""Kernel family 3: the top-K routes, as a gather kernel, a torch epilogue on (N, K) and a scatter kernel.

For each token on a top-K route, the K output-projection rows picked by its source's top-K (from the
statistics kernel) give the student's logits at those ids:
    ``_gather_logits_kernel``  z_K[n, k] = T(W[idx[n, k]] . h[n] + b[idx[n, k]]) / tau     (N, K) fp32
(T the student's transform, ``softcap.py``). Both sides are renormalized over the K ids and
``divergences.divergence_and_grad`` gives the value and dz_K (N, K), then ``LogitTransform.chain_grad_``
chains it through T, in torch: the tensors are N x K, so this is the same code as the PyTorch path, not a
restatement.
    ``_scatter_grad_kernel``  d h[n] += sum_k dz[n, k] W[idx[n, k]];  d W[idx[n, k]] += dz[n, k] h[n];
                              d b[idx[n, k]] += dz[n, k]                 (fp32, atomics for d W / d b)
Rows off the top-K routes (full-support rows, masked tokens) load nothing: their row weight is 0.

Shapes: hidden (N, Hs), weight (>= V, Hs), idx (N, K) int64 in [0, V). FLOPs: 4 K Hs per top-K token.
Bytes per top-K token: K Hs x (2 reads of W rows in the weight dtype, the second mostly from L2) + K Hs x 4
(fp32 atomic adds into d W). H200, N = 16384 x 0.75 top-K tokens, K = 128, Hs = 2048, bf16: 2 x 6.4 GB of
gathers + 12.9 GB of atomics ~ 5-8 ms (the torch version staged a (C, K, Hs) fp32 copy per chunk and
index_add_-ed it: ~80 GB of traffic, ~17 ms predicted). The d W sum order follows the atomics: like
``index_add_`` on CUDA it is not bitwise reproducible run to run.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..chunked_stats import LinearStats
from ..config import RouteConfig
from ..divergences import divergence_and_grad
from ..transform import IDENTITY, LogitTransform
from .blocks import Blocks, blocks_for
from .softcap import kernel_transform, transform_logits
from .tables import route_tables


@triton.jit
def _gather_logits_kernel(h_ptr, w_ptr, b_ptr, idx_ptr, on_ptr, z_ptr, K, hidden, stride_hn, stride_wv, pre, post,
                          HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_H: tl.constexpr):
    """Program (token n, block of K ids): z[n, ks] = T(W[idx] . h[n] + b[idx]) / tau (softcap.py), 0 for rows off."""
    n = tl.program_id(0).to(tl.int64)  # N x Hs and N x K offsets may pass 2^31
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    live_k = tl.where(tl.load(on_ptr + n) != 0, K, 0)  # a row that is off reads nothing
    k_ok = ks < live_k
    ids = tl.load(idx_ptr + n * K + ks, mask=k_ok, other=0)
    live_h = tl.where(live_k > 0, hidden, 0)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for h0 in range(0, live_h, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_ok = hs < live_h
        x = tl.load(h_ptr + n * stride_hn + hs, mask=h_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + ids[:, None] * stride_wv + hs[None, :], mask=k_ok[:, None] & h_ok[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + ids, mask=k_ok, other=0.0).to(tl.float32)
    tl.store(z_ptr + n * K + ks, transform_logits(acc, pre, post, SOFTCAP), mask=ks < K)


@triton.jit
def _scatter_grad_kernel(dz_ptr, h_ptr, w_ptr, idx_ptr, on_ptr, dh_ptr, dw_ptr, db_ptr, K, hidden,
                         stride_hn, stride_wv,
                         WANT_DH: tl.constexpr, WANT_DW: tl.constexpr, WANT_DB: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
    """Program (token n, hidden slice): d h[n, slice] += dz[n] W[idx[n], slice]; d W[idx[n], slice] += dz[n] h[n, slice].

    Each (n, slice) of d h has one owner (plain read-add-write); d W rows are shared across tokens (atomics).
    """
    n = tl.program_id(0).to(tl.int64)  # N x Hs and N x K offsets may pass 2^31
    pid_h = tl.program_id(1)
    live_k = tl.where(tl.load(on_ptr + n) != 0, K, 0)  # a row that is off reads and adds nothing
    hs = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = hs < tl.where(live_k > 0, hidden, 0)
    x = tl.load(h_ptr + n * stride_hn + hs, mask=h_ok, other=0.0).to(tl.float32)
    dh = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k0 in range(0, live_k, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < live_k
        ids = tl.load(idx_ptr + n * K + ks, mask=k_ok, other=0)
        g = tl.load(dz_ptr + n * K + ks, mask=k_ok, other=0.0)
        tile = k_ok[:, None] & h_ok[None, :]
        if WANT_DH:
            w = tl.load(w_ptr + ids[:, None] * stride_wv + hs[None, :], mask=tile, other=0.0)
            dh += tl.sum(w.to(tl.float32) * g[:, None], axis=0)
        if WANT_DW:
            # relaxed: fire-and-forget reductions (red.global), nothing reads d W in this kernel
            tl.atomic_add(dw_ptr + ids[:, None] * hidden + hs[None, :], g[:, None] * x[None, :], mask=tile,
                          sem="relaxed")
        if WANT_DB:
            tl.atomic_add(db_ptr + ids, g, mask=ks < tl.where(pid_h == 0, live_k, 0), sem="relaxed")  # once per token
    if WANT_DH:
        ptrs = dh_ptr + n * hidden + hs
        tl.store(ptrs, tl.load(ptrs, mask=h_ok, other=0.0) + dh, mask=h_ok)


def gather_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], idx: torch.Tensor,
                  on: torch.Tensor, inv_tau: float, blocks: Blocks,
                  transform: LogitTransform = IDENTITY) -> torch.Tensor:
    """(N, K) fp32 student logits ``transform(h W[idx]^T + b[idx]) * inv_tau`` for rows where ``on`` (0
    elsewhere). hidden (N, Hs), weight (>= V, Hs)."""
    n, k = idx.shape
    hidden = hidden.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    idx = idx.contiguous()
    z = torch.empty(n, k, dtype=torch.float32, device=hidden.device)
    tf = kernel_transform(transform, inv_tau)
    if n and k:
        _gather_logits_kernel[(n, triton.cdiv(k, blocks.gather_k))](
            hidden, weight, bias if bias is not None else weight, idx, on.to(torch.int8), z, k, hidden.shape[1],
            hidden.stride(0), weight.stride(0), float(tf.pre), float(tf.post),
            HAS_BIAS=bias is not None, SOFTCAP=tf.softcap, BLOCK_K=blocks.gather_k, BLOCK_H=blocks.gather_h)
    return z


def scatter_grad(dz: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor, on: torch.Tensor,
                 grads: dict[str, Optional[torch.Tensor]], blocks: Blocks) -> None:
    """Fold the (N, K) fp32 logit gradient ``dz`` into grads["hidden"] (N, Hs), ["weight"] (V, Hs), ["bias"] (V,).

    The gradient buffers must be contiguous fp32 (the kernel indexes them with row stride Hs).
    """
    n, k = idx.shape
    hs = hidden.shape[1]
    want = {name: grads[name] is not None for name in ("hidden", "weight", "bias")}
    for name, on_ in want.items():
        if on_ and not (grads[name].is_contiguous() and grads[name].dtype == torch.float32):
            raise ValueError(f"scatter_grad: grads[{name!r}] must be a contiguous float32 tensor")
    if not (n and k and any(want.values())):
        return
    hidden = hidden.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    dummy = dz  # never dereferenced when the matching WANT_* is off
    _scatter_grad_kernel[(n, triton.cdiv(hs, blocks.gather_h))](
        dz.contiguous(), hidden, weight, idx.contiguous(), on.to(torch.int8),
        grads["hidden"] if want["hidden"] else dummy, grads["weight"] if want["weight"] else dummy,
        grads["bias"] if want["bias"] else dummy, k, hs, hidden.stride(0), weight.stride(0),
        WANT_DH=want["hidden"], WANT_DW=want["weight"], WANT_DB=want["bias"],
        BLOCK_K=blocks.gather_k, BLOCK_H=blocks.gather_h)


def topk_rows(*, route: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
              stats: dict[str, LinearStats], config: RouteConfig, red_w: torch.Tensor, per_token: torch.Tensor,
              grads: dict[str, Optional[torch.Tensor]], transform: LogitTransform = IDENTITY) -> None:
    """Add the top-K routes' losses to ``per_token`` (N,) and their gradients to the fp32 ``grads``.

    route (N,) int64 (-1 masked); hidden (N, Hs) student; weight (>= V, Hs), bias or None (student);
    stats[source] with topk_vals / topk_idx (N, K) for each source a top-K route reads (transformed);
    ``transform``: the student's. No host sync.
    """
    inv_tau = 1.0 / config.temperature
    blocks = blocks_for(hidden.device)
    tables = route_tables(config, hidden.device)
    r = route.clamp_min(0)
    rw = torch.where(route >= 0, tables.topk_weight[r], 0.0)
    on = rw != 0
    if len(stats) == 2:
        pick_t = tables.topk_from_teacher[r][:, None]
        idx = torch.where(pick_t, stats["teacher"].topk_idx, stats["self"].topk_idx)
        vals = torch.where(pick_t, stats["teacher"].topk_vals, stats["self"].topk_vals)
    else:
        only = next(iter(stats.values()))
        idx, vals = only.topk_idx, only.topk_vals
    hidden = hidden.contiguous()  # once, for both kernels
    z = gather_logits(hidden, weight, bias, idx, on, inv_tau, blocks, transform)
    logp = z.log_softmax(-1)
    logp_src = vals.float().log_softmax(-1)
    loss = torch.zeros_like(rw)
    dz = torch.zeros_like(logp)
    for kind, of_kind in tables.topk_kind.items():
        value, g = divergence_and_grad(logp, logp_src, kind, config.jsd_beta)
        sel = on & of_kind[r]
        loss = loss + torch.where(sel, rw * value, 0.0)
        dz = dz + torch.where(sel[:, None], rw[:, None] * g, 0.0)
    per_token += loss
    # The chain factor on (N, K), before the scatter: red_w * scale / tau per row, and under a soft-cap the
    # slope 1 - tanh^2 from the gathered logits (0 at -inf). The PyTorch path's own code: O(N K) elementwise.
    transform.chain_grad_(dz, z if transform.grad_needs_logits else None, inv_tau, red_w)
    scatter_grad(dz, hidden, weight, idx, on, grads, blocks)
