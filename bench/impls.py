"""The implementations compared by the benchmarks, each as a zero-argument callable on shared inputs.

Modes: ``fwdbwd`` (loss forward + backward into the student's hidden states and weight) and ``stats``
(the routing statistics pass alone: per-token log-prob of the sampled token under the self and teacher
projections, their top-K, and the routing decision).

| name | what |
|---|---|
| reference | ``routed_loss(backend="reference")``: the library's ground truth, full logits in float64 |
| naive | full logits in the input dtype + ``routed_loss_from_logits`` (what a user would write) |
| liger / liger_compiled | Liger-Kernel ``LigerFusedLinearJSDLoss`` (one teacher, JSD only), eager / torch.compile |
| floor_5gemm | the five GEMMs of the naive computation (student, self, teacher logits, d hidden, d weight) |
| floor_alg | the algorithmic floor: 2 GEMMs over all tokens + 4 GEMMs over the HT-routed tokens |
| torch | ``routed_loss(backend="torch")`` with its torch code (the compiled extension switched off) |
| torch+ext | the same with the compiled epilogues of ``csrc/`` (``python -m dopd_kernels.ext build``) |
| triton | ``routed_loss(backend="triton")`` (CUDA only) |
"""

from __future__ import annotations

import os
import shutil
from typing import Callable, Optional

import torch

from bench.inputs import BenchInputs
from dopd_kernels import RouteConfig, ext, routed_loss, routed_loss_from_logits
from dopd_kernels.chunked_stats import linear_stats
from dopd_kernels.routing import route_tokens

FWDBWD_IMPLS = ("reference", "naive", "liger", "liger_compiled", "floor_5gemm", "floor_alg", "torch", "torch+ext",
                "triton")
#: triton_nok: the Triton statistics pass without the top-K (the top-K's cost is triton - triton_nok);
#: triton_2pass: its two-pass mode (Triton GEMM into fp32 chunk logits, then the same kernel reading them);
#: triton_cuda: cuBLAS GEMM into fp32 chunk logits, then the extension's row_stats op (stats_impl="cuda").
STATS_IMPLS = ("naive", "floor_alg", "torch", "torch+ext", "triton", "triton_nok", "triton_2pass", "triton_cuda")
#: Our implementations (run in the scaling sweeps) and the floor they are measured against.
OURS = ("torch", "torch+ext", "triton")
FLOORS = ("floor_5gemm", "floor_alg")


def skip_reason(impl: str, device: str) -> Optional[str]:
    """Why ``impl`` cannot run on ``device`` here, or None when it can."""
    if impl in ("torch+ext", "triton_cuda"):
        from dopd_kernels import ext

        if not ext.is_available():
            return "the compiled extension is not built: python -m dopd_kernels.ext build"
        if device == "cuda" and not ext.has_cuda():
            return "the compiled extension was built without CUDA kernels (no nvcc at build time)"
    if impl.startswith("triton"):
        if device != "cuda":
            return "backend='triton' needs CUDA (this machine has none)"
        try:
            import dopd_kernels.triton  # noqa: F401
        except ImportError as err:
            return f"dopd_kernels.triton is not importable: {err}"
    if impl.startswith("liger"):
        try:
            import liger_kernel.chunked_loss  # noqa: F401
        except ImportError as err:
            return f"liger-kernel is not installed: {err}"
    if impl == "liger_compiled" and device == "cpu":
        # torch.compile's CPU backend (inductor) generates C++ and needs a compiler.
        if not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")):
            return "torch.compile on CPU needs a C++ compiler (g++/clang++), none found"
    return None


def _seq(x: BenchInputs, t: torch.Tensor) -> torch.Tensor:
    """View N-leading ``t`` as (B, T, ...) so the loss's seq_mean reduction sees sequences."""
    return t.view(*x.seq_shape, *t.shape[1:])


def _routed(x: BenchInputs, impl: str):
    """routed_loss for impl "reference" | "torch" (extension off) | "torch+ext" (extension on) | "triton"."""
    with ext.forced(impl == "torch+ext"):
        return routed_loss(
            _seq(x, x.student_hidden), x.student_weight, _seq(x, x.teacher_hidden), x.teacher_weight,
            _seq(x, x.self_hidden), _seq(x, x.target_ids), backend="torch" if impl == "torch+ext" else impl,
        )


def _naive_logits(x: BenchInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student (with grad), self and teacher logits, full N x V in the input dtype."""
    z_s = x.student_hidden @ x.student_weight.T
    with torch.no_grad():
        z_p = x.self_hidden @ x.student_weight.T
        z_t = x.teacher_hidden @ x.teacher_weight.T
    return z_s, z_p, z_t


def _fwdbwd(impl: str, x: BenchInputs, n_ht: int) -> Callable[[], object]:
    if impl in ("reference", "torch", "torch+ext", "triton"):
        return lambda: _routed(x, impl).loss.backward()
    if impl == "naive":

        def naive() -> None:
            z_s, z_p, z_t = _naive_logits(x)
            out = routed_loss_from_logits(_seq(x, z_s), _seq(x, z_t), _seq(x, z_p), _seq(x, x.target_ids))
            out.loss.backward()

        return naive
    if impl.startswith("liger"):
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        # Pure distillation (no hard-label CE), JS divergence: the closest Liger has to the HT route.
        loss_fn = LigerFusedLinearJSDLoss(
            weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5, compiled=impl == "liger_compiled"
        )
        return lambda: loss_fn(
            x.student_hidden, x.student_weight, x.teacher_hidden, x.teacher_weight, x.target_ids
        ).backward()
    h_s, w_s = x.student_hidden.detach(), x.student_weight.detach()
    if impl == "floor_5gemm":

        def five_gemms() -> None:
            z_s = h_s @ w_s.T
            _ = x.self_hidden @ w_s.T
            _ = x.teacher_hidden @ x.teacher_weight.T
            _ = z_s @ w_s  # d hidden = dZ W (z_s stands in for dZ: same shape, same cost)
            _ = z_s.T @ h_s  # d weight = dZ^T H

        return five_gemms
    if impl == "floor_alg":
        h_ht = h_s[:n_ht]

        def alg_floor() -> None:
            _ = x.self_hidden @ w_s.T  # self statistics
            _ = x.teacher_hidden @ x.teacher_weight.T  # teacher statistics
            # HT tokens: student logits, their recomputation in backward (O(N x K) memory forbids keeping
            # them), d hidden, d weight.
            z = h_ht @ w_s.T
            _ = h_ht @ w_s.T
            _ = z @ w_s
            _ = z.T @ h_ht

        return alg_floor
    raise ValueError(f"unknown implementation {impl!r}")


def _stats(impl: str, x: BenchInputs) -> Callable[[], object]:
    config = RouteConfig()
    k = config.effective_top_k(x.shape.v)
    valid = torch.ones_like(x.target_ids, dtype=torch.bool)
    y = x.target_ids
    h_s, w_s = x.self_hidden, x.student_weight.detach()
    if impl == "naive":

        def naive_stats() -> object:
            with torch.no_grad():
                _, z_p, z_t = _naive_logits(x)
                z_p, z_t = z_p.float(), z_t.float()
                l_p = z_p.log_softmax(-1).gather(1, y[:, None]).squeeze(1)
                l_t = z_t.log_softmax(-1).gather(1, y[:, None]).squeeze(1)
                tops = (z_p.topk(k, dim=-1), z_t.topk(k, dim=-1))
                return route_tokens(l_p, l_t, valid, config), tops

        return naive_stats
    if impl in ("torch", "torch+ext"):
        w_s32, w_t32 = w_s.float(), x.teacher_weight.float()

        def torch_stats() -> object:
            # The same calls as steps 2-3 of dopd_kernels.chunked (both sources need top-K under DOPD).
            with torch.no_grad(), ext.forced(impl == "torch+ext"):
                kw = dict(inv_tau=1.0, top_k=k, chunk_size=config.chunk_size)
                s_p = linear_stats(h_s, w_s32, None, y, **kw)
                s_t = linear_stats(x.teacher_hidden, w_t32, None, y, **kw)
                return route_tokens(s_p.target_logprob, s_t.target_logprob, valid, config)

        return torch_stats
    if impl in ("triton", "triton_nok", "triton_2pass", "triton_cuda"):
        from dopd_kernels.triton.stats import fused_linear_stats

        k_run = 0 if impl == "triton_nok" else k
        mode = {"triton_2pass": "two_pass", "triton_cuda": "cuda"}.get(impl, "fused")

        def triton_stats() -> object:
            # The same calls as stage 1 of dopd_kernels.triton.function (both sources need top-K under DOPD).
            with torch.no_grad():
                s_p = fused_linear_stats(h_s, w_s, None, y, vocab=x.shape.v, inv_tau=1.0, top_k=k_run, impl=mode)
                s_t = fused_linear_stats(x.teacher_hidden, x.teacher_weight.detach(), None, y, vocab=x.shape.v,
                                         inv_tau=1.0, top_k=k_run, impl=mode)
                return route_tokens(s_p.target_logprob, s_t.target_logprob, valid, config)

        return triton_stats
    if impl == "floor_alg":

        def stats_floor() -> None:
            _ = h_s @ w_s.T
            _ = x.teacher_hidden @ x.teacher_weight.T

        return stats_floor
    raise ValueError(f"no stats-only pass for {impl!r}")


def build_runner(impl: str, mode: str, x: BenchInputs, n_ht: int) -> Callable[[], object]:
    """A callable running ``impl`` once in ``mode`` ("fwdbwd" | "stats") on ``x``.

    n_ht: number of HT-routed tokens (measured by our loss on ``x``), used by the algorithmic floor.
    Call ``x.zero_grads()`` between fwdbwd calls so gradients are not accumulated.
    """
    if mode == "fwdbwd":
        return _fwdbwd(impl, x, n_ht)
    if mode == "stats":
        return _stats(impl, x)
    raise ValueError(f"unknown mode {mode!r}")


@torch.no_grad()
def route_fractions(x: BenchInputs) -> dict[str, float]:
    """Fractions of the four DOPD routes on ``x``, as measured by our loss (PyTorch path)."""
    out = _routed(x, "torch")
    return {k: v for k, v in out.metrics().items() if k.startswith("frac/")}
