"""The PyTorch path's calls into the compiled extension (``dopd_kernels.ext``): the fused per-chunk epilogues.

Each helper returns None / False when the extension does not cover the case (not loaded, ``DOPD_EXT=0``, not
float32, a chunk with a CE term or a sampled route), and the caller runs its torch code instead. The ops take the
chunk logits as the torch code computes them (projection, logit transform, then the temperature), so only the
gradient's chain factors (and a soft-cap, for its derivative) are passed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from . import ext
from .config import RouteConfig

if TYPE_CHECKING:
    from .chunked_losses import GradBuffers, Projection
    from .chunked_stats import LinearStats

Tensor = torch.Tensor


#: The CUDA kernels' largest K (csrc/cuda/launch.h: kMaxTopK); the CPU kernels have no limit.
CUDA_MAX_TOP_K = 4096


def _k_fits(t: Tensor, k: int) -> bool:
    """Whether the ops take a top-K of ``k`` on ``t``'s device."""
    return t.device.type != "cuda" or k <= CUDA_MAX_TOP_K


def chunk_stats(z: Tensor, targets: Tensor, top_k: int) -> Optional[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """(lse, target logit, top-K values, top-K ids) of a (C, V) chunk in one pass, or None without the extension."""
    if not (ext.usable(z) and _k_fits(z, top_k) and z.stride(1) == 1):
        return None
    return ext.row_stats(z, targets, top_k)


def _runs(route_rows: Tensor) -> list[tuple[int, int, int]]:
    """(route id, start, stop) of each run of equal ids (rows come sorted by route: one run per route)."""
    ids, counts = torch.unique_consecutive(route_rows, return_counts=True)
    out, start = [], 0
    for rid, count in zip(ids.tolist(), counts.tolist()):
        out.append((rid, start, start + count))
        start += count
    return out


def full_chunk_rows(config: RouteConfig, student: "Projection") -> int:
    """Rows per chunk of the student-full rows: 2 x chunk_size where the ops cover every such chunk.

    The ops hold two (C, V) buffers (student, source; in place) where the torch code holds about five, so twice
    the rows still peak below it, and the GEMMs of 512 rows run ~10% closer to the BLAS peak than 256 on CPU.
    """
    covered = (config.ce_weight == 0 and all(spec.support != "sampled" for spec in config.routes)
               and student.dtype == torch.float32 and ext.usable(student.weight))
    return 2 * config.chunk_size if covered else config.chunk_size


def full_chunk(z: Tensor, chunk: Tensor, *, route: Tensor, targets: Tensor, student: "Projection",
               sources: dict[str, tuple[Tensor, "Projection"]], red_w: Tensor, config: RouteConfig,
               student_logprob: Tensor, want_grad: bool) -> Optional[Tensor]:
    """Per-token losses (C,) of a chunk of student-full rows, computed in place over z, or None.

    z: the chunk's (C, V) student logits ``transform(h W^T + b) / tau``; on success z holds the gradient with
    respect to the raw logits ``h W^T + b`` (route weight, reduction weight, 1/tau and the transform's derivative
    included), ready to be folded into d hidden / d weight. Covers chunks whose rows are all on full-support
    routes without a CE term; ``student_logprob[chunk]`` is filled.
    """
    if config.ce_weight > 0 or not ext.usable(z):
        return None
    runs = _runs(route.index_select(0, chunk))
    if any(config.routes[rid].support != "full" for rid, _, _ in runs):
        return None
    from .chunked_stats import scaled_logits

    inv_tau = 1.0 / config.temperature
    # z = cap' tanh(u / cap') with cap' = softcap / tau and u = scale * raw / tau: the op takes the derivative
    # with respect to u from z and cap'; d u / d raw = scale / tau goes into grad_scale.
    softcap = 0.0 if student.transform.softcap is None else student.transform.softcap * inv_tau
    chain = student.transform.scale * inv_tau
    loss = torch.empty(chunk.numel(), dtype=z.dtype, device=z.device)
    for rid, start, stop in runs:
        spec, weight = config.routes[rid], config.route_weight(rid)
        rows = chunk[start:stop]
        src_hidden, src = sources[spec.source]
        z_src = scaled_logits(src_hidden.index_select(0, rows), src.weight, src.bias, inv_tau, src.transform,
                              src.dtype)
        grad_scale = red_w.index_select(0, rows).to(torch.float32) * (weight * chain if want_grad else 0.0)
        value, logprob = ext.full_divergence_(z[start:stop], z_src.float(), targets.index_select(0, rows),
                                              spec.divergence, config.jsd_beta, 1.0, grad_scale, softcap)
        loss[start:stop] = value * weight
        student_logprob.index_copy_(0, rows, logprob.to(student_logprob.dtype))
    return loss


def topk_rows(rows: Tensor, *, route: Tensor, student_hidden: Tensor, student: "Projection", stats: "LinearStats",
              red_w: Tensor, config: RouteConfig, per_token: Tensor, grads: "GradBuffers") -> bool:
    """Losses and gradients of the rows on one source's top-K routes (sorted by route), or False.

    One op call per route: the student's logits at the source's K ids, the divergence, and d hidden, d W, d b
    added into ``grads`` by the op (no (C, K, H) gathered rows, no index_add).
    """
    if not (ext.usable(student.weight) and stats.topk_vals.dtype == torch.float32
            and _k_fits(student.weight, stats.topk_idx.shape[1])):
        return False
    # the op reads W and b by row with unit stride (a transposed view, e.g. a tied head stored as (H, V), is not)
    if student.weight.stride(1) != 1 or (student.bias is not None and not student.bias.is_contiguous()):
        return False
    if grads.hidden is not None and grads.hidden.dtype != torch.float32:
        return False
    hidden = student_hidden.to(torch.float32).contiguous()
    for rid, start, stop in _runs(route.index_select(0, rows)):
        spec, weight = config.routes[rid], config.route_weight(rid)
        part = rows[start:stop]
        grad_scale = red_w.index_select(0, part).to(torch.float32) * (weight if grads.any else 0.0)
        value = ext.topk_divergence(
            hidden, part, student.weight, student.bias, stats.topk_idx, stats.topk_vals, spec.divergence,
            config.jsd_beta, 1.0 / config.temperature, grad_scale, grads.hidden, grads.weight, grads.bias,
            student.transform.scale, student.transform.softcap or 0.0)
        per_token.index_add_(0, part, (value * weight).to(per_token.dtype))
    return True
