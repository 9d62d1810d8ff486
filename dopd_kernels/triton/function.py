"""``backend="triton"``: orchestration of the fused kernels and the autograd Function.

Design note (cost model of dopd-method.md; N tokens, V vocabulary, HT = tokens on full-support routes)
--------------------------------------------------------------------------------------------------------
Stages (all on the device, no host sync, so the loss can be captured in a CUDA graph):
1. ``stats.py``  self and teacher: fused h W^T tiles + online lse + target logit + streaming top-K
   (``candidates.py``: threshold compare, list append, exact cut to K). 2 GEMMs over all N (N Hs V + N Ht V
   MACs); writes O(N x splits x CAP) candidates.
2. ``routing.route_tokens`` (shared, on device) on the two target log-probs.
3. ``full_support.py``  rows needing the student's full softmax (HT for DOPD; all rows for vanilla OPD,
   GKD, SDPO; plus every row when ce_weight > 0), sorted to the front; per chunk of C rows: z_s, z_src
   GEMMs into a C x V fp32 scratch, a row kernel (student lse, value, dz in place), dh and dW GEMMs with
   fp32 accumulation: the floor's 4 GEMMs over HT + ~40 bytes x V per row of scratch traffic. All N / C
   chunks launch (the live count is on the device), but a chunk past the count returns at once: the fp32
   d W is read and written by the HT / C live chunks only. dz enters the dh / dW GEMMs as bf16 for bf16
   models and, for fp16 models, as fp16 after a per-chunk power-of-two scale (its max |dz| recorded by the
   row kernel): dz carries the ~1/N reduction weight and would flush to zero in plain fp16.
4. ``topk.py``  top-K routes: a gather kernel for the student's K logits, the renormalized divergence
   and its gradient in torch on (N, K), a scatter kernel into d h / d W / d b.
Gradients are finished in the forward and attached by ``attach.attach_grads`` (backward = scale by
grad_output; fp16 gradients are held in fp32 until then, so AMP's loss scale reaches them before the
conversion). Launches run under the tensors' CUDA device (``device_guard``). Offsets that a stride
multiplies are int64 in every kernel (V x H and C x V pass 2^31 at real sizes).
CUDA graphs: run one call (forward and backward) before capturing: it compiles the kernels, copies the
route tables to the device (``tables.py``; tables read during a capture are never evicted) and runs
backend="auto"'s one-time self-check (``selfcheck.py``); use ``check_values=False`` inside the graph.
Compile coverage: tests/test_triton_compile.py compiles every variant the launcher emits (157: presets, CE,
custom tables, bf16 / fp16 / fp32, biases, two-pass, gradients or not, soft-caps) for sm_90 and checks wgmma,
shared memory (max 128 KB of 227 KB), 64-bit offsets and the rows kernel's barrier.
Logit transforms (``softcap.py``): each model's LogitTransform is the epilogue of every kernel that forms
its logits (statistics tile, two-pass and full-support logit GEMMs, top-K gather). A multiplier folds into
the 1 / tau multiply, so identity and multiplier-only models run the variants compiled before transforms
existed (the GEMM's identity variants have no exp2 at all: checked by the sweep); a soft-cap compiles
variants of its own (constexpr SOFTCAP): one tanh per logit per pass, -inf kept, and the slope
1 - tanh^2 read off the stored logits in the rows kernel's gradient sweep (~4 instructions per logit of a
memory-bound sweep) and off the (N, K) gathered logits before the scatter (torch, O(N K)). Its cost, from
the sm_90 SASS of the twin variants (static counts, executed once per tile and thread): +691 instructions
(2 MUFU per logit) per 64 x 128 statistics tile with top-K (32 logits per thread; 255 registers either
way, spills unchanged at ~1.4 KB), +2029 per 128 x 128 tile without top-K (226 -> 255 registers, no
spills), +1658 per 128 x 128 logit-GEMM tile (116 -> 146 registers). Predicted on an H200 (1.98 GHz, 4
issue slots per SM, epilogue not overlapped with the MMA, not measured): +0.7 us per 64 x 128 top-K tile
against ~7 us of MMA at Hs = 2048 (+10 %; +5 % at Ht = 4096), i.e. ~1.6 ms per soft-capped model in stage 1
at N = 16384, V = 151936 (~2.3 ms without top-K, or in the two-pass GEMM's epilogue ~1.9 ms); ~0.5 ms per
logit GEMM of stage 3 (HT = 0.25 N); stage 4 ~0. Gemma 2 (all three models capped) with dopd: ~+4-5 ms on
the ~108-130 ms below (~4 %); the MUFU pipe (the tanh's 2 + the log-sum-exp's 1 per logit: ~1.5K cycles
per top-K tile) stays under the issue time.

Predicted H200 time, N=16384, Hs=2048, Ht=4096, V=151936, bf16, HT fraction 0.25, K=128 (not measured:
no GPU has been lent to a build session yet):
    floor (cuBLAS at ~700 TFLOP/s): self 10.2 + teacher 20.4 + HT (2.6 + 5.1 + 2.6 + 2.6) = 43.4 TFLOP ~ 62 ms
    stage 1: 30.6 TFLOP in 64 x 128 wgmma tiles (the top-K tile: blocks.py) at ~450-600 TFLOP/s ~ 51-68 ms
             for the GEMM, plus the per-tile epilogues that do not overlap it (one 255-register CTA per SM):
             the log-sum-exp ~0.6K and the top-K compare / row scan / append ~1.6K instructions per thread
             and tile (SASS, sm_90) against ~7 us of MMA per tile, ~+30 %; the list cuts (~6 per program,
             32-step bisections over a 512-slot list) ~+5 % -> ~68-90 ms. The two-pass mode (blocks.stats_impl:
             per 512-row chunk a plain 128 x 128-tile GEMM writes fp32 logits, 20 GB written + read per
             model, then the same kernel reads them; its epilogue is bound by instruction issue, ~6-8 ms per
             model) predicts ~59-67 ms. The statistics benchmarks (triton, triton_2pass, triton_nok,
             floor_alg) decide on a GPU; the default stays "fused", the issue's design, until then.
    stage 3: 12.8 TFLOP ~ 20 ms + scratch sweeps (25 GB) ~ 5 ms + dW fp32 read/write per chunk
             (2.5 GB x HT / C: 16 chunks at C = 256) ~ 8 ms  (C = config.chunk_size; 512 halves this)
    stage 4: gathers 2 x 6.4 GB + 12.9 GB of fp32 atomics ~ 5-8 ms (the torch version it replaced: ~17 ms)
    total ~ 108-130 ms = 1.75-2.1x the floor with the fused stage 1, ~99-107 ms = 1.6-1.75x with the
    two-pass one (~92-100 ms if its GEMM were cuBLAS's, via torch.mm(..., out_dtype=torch.float32) on
    CUDA: not used, untestable here): short of the issue's 1.3x goal either way. By the same model the
    previous design (a bitonic top-K merge that forced 16-row GEMM tiles, L2-bound at ~14 FLOP/byte) would
    have been ~2.5-3.5x. What to measure first on a GPU: the statistics pass alone, triton with and without
    top-K against torch (bench/test_compare.py's stats cases), blocks.topk_n 64 vs 128, C, and autotuned
    tiles for stages 1 and 3.
Extra memory: 2 C x V fp32 scratch (311 MB at C = 256) + the candidate lists of one statistics pass
    (N x splits x CAP x 8 B = 134 MB at N = 16384, 64-row blocks so 2 splits, CAP = 512; the epilogue reads
    only the K slots left by the kernel's last cut) + O(N x K) top-K tensors (~25 MB)
    + the fp32 gradient accumulators (N Hs + V Hs floats: 134 MB + 1.24 GB at V = 151936, Hs = 2048; the
    torch path's are the same). The fp32 d W accumulator alone exceeds the issue's 1 GB: it is the price
    of fp32 accumulation for bf16 weights (Liger accumulates in the weight dtype, 0.62 GB).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from ..attach import attach_grads
from ..chunked import chunked_routed_loss
from ..config import RouteConfig
from ..transform import IDENTITY, LogitTransform
from ..output import RoutedLossOutput
from ..reduction import reduction_weights
from ..routing import route_tokens
from .blocks import blocks_for
from .full_support import KIND_CODES, KIND_NONE, Model, student_full_rows
from .stats import fused_linear_stats
from .tables import route_tables
from .topk import topk_rows

Tensor = torch.Tensor


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on ``device``: Triton launches on the current CUDA device and stream, which need not be the
    tensors' (tensors on cuda:1 while cuda:0 is current). A no-op off CUDA."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def triton_routed_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    self_hidden: Tensor,
    target_ids: Tensor,
    valid: Tensor,
    *,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    self_weight: Optional[Tensor] = None,
    self_bias: Optional[Tensor] = None,
    hard_labels: Optional[Tensor] = None,
    config: RouteConfig,
    student_transform: LogitTransform = IDENTITY,
    teacher_transform: LogitTransform = IDENTITY,
    self_transform: LogitTransform = IDENTITY,
) -> RoutedLossOutput:
    """The routed loss with the Triton kernels. Arguments and results as ``chunked_routed_loss``.

    float64 inputs go to the PyTorch path (the kernels accumulate in fp32). Masked tokens are carried
    through the statistics pass (cost N, not the valid count) but never routed, weighted or reduced.
    """
    if torch.float64 in (student_hidden.dtype, student_weight.dtype, teacher_hidden.dtype, teacher_weight.dtype):
        return chunked_routed_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, self_hidden, target_ids, valid,
            student_bias=student_bias, teacher_bias=teacher_bias, self_weight=self_weight, self_bias=self_bias,
            hard_labels=hard_labels, config=config, student_transform=student_transform,
            teacher_transform=teacher_transform, self_transform=self_transform)
    shape = target_ids.shape
    vocab, hs = student_weight.shape
    device = student_hidden.device
    blocks = blocks_for(device)
    inv_tau = 1.0 / config.temperature
    k = config.effective_top_k(vocab)
    flat_valid = valid.reshape(-1).to(torch.bool)
    n = flat_valid.numel()
    y = torch.where(flat_valid, target_ids.reshape(-1), 0)  # masked ids may be -100
    yh = y if hard_labels is None else torch.where(flat_valid, hard_labels.reshape(-1), 0)
    h_s = student_hidden.detach().reshape(n, hs)
    h_p = self_hidden.detach().reshape(n, hs)
    h_t = teacher_hidden.detach().reshape(n, teacher_hidden.shape[-1])
    w_s = student_weight.detach()
    b_s = None if student_bias is None else student_bias.detach()
    w_p, b_p = (w_s, b_s) if self_weight is None else (self_weight.detach(), None if self_bias is None else self_bias.detach())
    w_t, b_t = teacher_weight.detach(), None if teacher_bias is None else teacher_bias.detach()
    topk_sources = config.topk_sources()
    want = torch.is_grad_enabled()

    with device_guard(device), torch.no_grad():
        stats = {
            "self": fused_linear_stats(h_p, w_p, b_p, y, vocab=vocab, inv_tau=inv_tau,
                                       top_k=k if "self" in topk_sources else 0, transform=self_transform),
            "teacher": fused_linear_stats(h_t, w_t, b_t, y, vocab=vocab, inv_tau=inv_tau,
                                          top_k=k if "teacher" in topk_sources else 0, transform=teacher_transform),
        }
        lp_self, lp_teacher = stats["self"].target_logprob, stats["teacher"].target_logprob
        routing = route_tokens(lp_self, lp_teacher, flat_valid, config)
        route = routing.route
        r = route.clamp_min(0)
        red_w = reduction_weights(valid.reshape(shape), config.reduction, torch.float32).reshape(-1)
        grads = {
            "hidden": torch.zeros(n, hs, dtype=torch.float32, device=device)
            if want and student_hidden.requires_grad else None,
            "weight": torch.zeros(vocab, hs, dtype=torch.float32, device=device)
            if want and student_weight.requires_grad else None,
            "bias": torch.zeros(vocab, dtype=torch.float32, device=device)
            if want and student_bias is not None and student_bias.requires_grad else None,
        }
        per_token = torch.zeros(n, dtype=torch.float32, device=device)
        student_logprob = torch.full((n,), float("nan"), dtype=torch.float32, device=device)

        full_specs = [s for s in config.routes if s.support in ("full", "sampled")]
        if full_specs or config.ce_weight > 0:
            tables = route_tables(config, device)
            kind = torch.where(route >= 0, tables.kind[r], KIND_NONE)
            use_t = tables.use_teacher[r]
            needs_full = flat_valid if config.ce_weight > 0 else kind != KIND_NONE
            # Rows needing the full softmax first (grouped by route); the kernels stop at the device count.
            order = torch.argsort(torch.where(needs_full, route, len(config.routes)), stable=True)
            count = needs_full.sum().to(torch.int32).reshape(1)
            uses = {(s.source, s.support) for s in full_specs}
            per_row = dict(
                y=y, yh=yh, kind=kind, rw=tables.weight[r],
                use_t=use_t, lse_t=stats["teacher"].lse, lse_p=stats["self"].lse,
                lsrc=torch.where(use_t != 0, lp_teacher, lp_self), red=red_w,
            )
            student_full_rows(
                order=order, count=count, student=Model(h_s, w_s, b_s, student_transform),
                teacher=Model(h_t, w_t, b_t, teacher_transform) if ("teacher", "full") in uses else None,
                self_model=Model(h_p, w_p, b_p, self_transform) if ("self", "full") in uses else None,
                per_row=per_row, vocab=vocab, inv_tau=inv_tau, jsd_beta=config.jsd_beta, ce_weight=config.ce_weight,
                flags={d: any(s.support == "full" and s.divergence == d for s in full_specs) for d in KIND_CODES}
                | {"sampled": any(s.support == "sampled" for s in full_specs)},
                chunk=config.chunk_size, blocks=blocks, per_token=per_token, student_logprob=student_logprob,
                grads=grads,
            )
        if topk_sources:
            topk_rows(route=route, hidden=h_s, weight=w_s, bias=b_s,
                      stats={s: stats[s] for s in sorted(topk_sources)}, config=config, red_w=red_w,
                      per_token=per_token, grads=grads, transform=student_transform)
        per_token = torch.where(flat_valid, per_token, 0.0)
        loss_value = (per_token * red_w).sum()

    # fp32 accumulators; attach_grads converts them (fp16: only after the scaling by grad_output)
    loss = attach_grads(
        loss_value, None if grads["hidden"] is None else grads["hidden"].reshape(student_hidden.shape),
        grads["weight"], grads["bias"], student_hidden, student_weight, student_bias,
    )

    def lazy_logprob() -> Tensor:
        """Student log-probs: from the full-softmax rows where computed, else one student stats pass."""
        with device_guard(device), torch.no_grad():
            missing = torch.isnan(student_logprob)
            fresh = fused_linear_stats(h_s, w_s, b_s, y, vocab=vocab, inv_tau=inv_tau,
                                       transform=student_transform).target_logprob
            out = torch.where(missing, fresh, student_logprob)
            return torch.where(flat_valid, out, 0.0).reshape(shape)

    def f32(x: Tensor) -> Tensor:
        return x.to(torch.float32).reshape(shape)

    return RoutedLossOutput(
        loss=loss,
        per_token_loss=per_token.reshape(shape),
        route=route.reshape(shape),
        adv_gap=f32(routing.adv_gap),
        q_self=f32(routing.q_self),
        q_teacher=f32(routing.q_teacher),
        student_logprob=lazy_logprob,
        thresholds=routing.thresholds,
        watched=[t for t in (student_hidden, student_weight, student_bias) if t is not None],
    )
