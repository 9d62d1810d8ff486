"""The cost model of ``shared/docs/dopd-method.md`` written out: predicted FLOPs and extra bytes per implementation.

The report prints each prediction next to the measurement, so a memory blow-up or a slow path shows as a
large measured/predicted ratio. Bytes are those allocated beyond the inputs (gradients included), summed over
the tensors each algorithm has to build, not a fit to the measurements: an implementation that frees them
early or fuses them (torch.compile) can stay below, one that keeps extra copies goes above.
"""

from __future__ import annotations

from bench.shapes import BenchShape
from dopd_kernels.chunked_stats import CONVERT_BLOCK_ELEMENTS

LIGER_CHUNK = 1024  # LigerFusedLinearJSDLoss default chunk_size
F32 = 4
CONVERT_BLOCK_BYTES = CONVERT_BLOCK_ELEMENTS * F32  # the PyTorch path's buffer of converted bf16 head rows


def gemm_flops(n: int, h: int, v: int) -> float:
    """FLOPs of one (n x h) @ (h x v) matrix product."""
    return 2.0 * n * h * v


def predicted_flops(impl: str, mode: str, s: BenchShape, n_ht: int) -> float:
    """GEMM FLOPs the algorithm needs (elementwise work ignored: it is O(N x V) against O(N x H x V))."""
    stats = gemm_flops(s.n, s.hs, s.v) + gemm_flops(s.n, s.ht, s.v)  # self + teacher logits
    if mode == "stats":
        return stats
    student_all = 3 * gemm_flops(s.n, s.hs, s.v)  # student logits, d hidden, d weight over all tokens
    if impl in ("reference", "naive", "floor_5gemm"):
        return stats + student_all
    if impl.startswith("liger"):
        return gemm_flops(s.n, s.ht, s.v) + student_all  # no self pass
    # floor_alg and our paths: the spec's floor (our paths aim at it; the ratio shows how close they get).
    return stats + 4 * gemm_flops(n_ht, s.hs, s.v)


def predicted_bytes(impl: str, mode: str, s: BenchShape, n_ht: int, chunk: int = 256, top_k: int = 128) -> float:
    """Predicted extra bytes of ``impl``: the sum of the tensors it has to build (see the per-branch comments)."""
    e = s.itemsize
    nv = s.n * s.v
    k = min(top_k, s.v)
    grads = (s.v * s.hs + s.n * s.hs) * e  # d weight + d hidden, in the input dtype
    if mode == "stats":
        if impl == "naive":
            return 2 * nv * e + 2 * nv * F32  # self + teacher logits and their log-softmax
        if impl == "floor_alg":
            return 2 * nv * e
        if impl == "triton_cuda":  # cuBLAS into 512-row fp32 chunk logits, the op's outputs
            return min(512, s.n) * s.v * F32 + 2 * s.n * k * (F32 + 8)
        if impl in ("triton", "triton_nok", "triton_2pass"):
            # per source: (N, splits) fp32 partials; with top-K the (rows per launch, splits, CAP) fp32 + int32
            # candidate lists, the epilogue's (rows, splits, K) int64 keys (~3 live temporaries), the top-K
            from dopd_kernels.triton.candidates import list_capacity

            # GPU tiles: 64-row top-K blocks, ~2 waves of programs; two-pass launches 512-row chunks
            rows = min(512, s.n) if impl == "triton_2pass" else s.n
            splits = max(1, -(-264 // -(-rows // 64)))
            partial = 3 * s.n * splits * F32
            if impl == "triton_nok":
                return partial
            chunk_logits = rows * s.v * F32 if impl == "triton_2pass" else 0
            lists = rows * splits * (list_capacity(k, 128) * 8 + 3 * k * 8)
            return partial + chunk_logits + lists + 2 * s.n * k * (F32 + 8)
        if impl == "torch+ext":  # one source's chunk logits (the op reads them in place), top-K of both sources
            return min(chunk, s.n) * s.v * F32 + 2 * s.n * k * (F32 + 8)
        # chunk logits of one source + its exp inside logsumexp, and top-K values/ids of both sources
        return 2 * min(chunk, s.n) * s.v * F32 + 2 * s.n * k * (F32 + 8)
    if impl in ("reference", "naive"):
        # three logit tensors + three log-softmaxes + the logits' gradient, in float64 (reference) / float32
        width = 8 if impl == "reference" else F32
        return 3 * nv * e + 4 * nv * width + grads
    if impl.startswith("liger"):
        c = min(LIGER_CHUNK, s.n)
        # per chunk: student and teacher logits, two log-softmaxes, the mixture, the logits' gradient;
        # plus a per-chunk d weight added into the accumulated one
        return 6 * c * s.v * F32 + s.v * s.hs * F32 + grads
    if impl == "floor_5gemm":
        return 3 * nv * e + grads  # the three logit tensors (the GEMMs' outputs)
    if impl == "floor_alg":
        return 2 * nv * e + 2 * n_ht * s.v * e + grads  # unchunked floor GEMM outputs
    fp32_grads = (s.v * s.hs + s.n * s.hs) * F32
    if impl == "torch+ext":
        # one phase at a time (each frees its chunk before the next GEMM): the statistics pass's chunk of
        # 4 x chunk tokens; the loss pass's student and source chunks of 2 x chunk tokens (the ops work in place)
        # beside the fp32 gradient accumulators; backward's gradients beside them. Plus top-K of both sources.
        stats_chunk = min(4 * chunk, s.n) * s.v * F32
        loss_chunks = 2 * min(2 * chunk, s.n) * s.v * F32
        return max(stats_chunk, loss_chunks + fp32_grads, fp32_grads + grads) + 2 * s.n * k * (F32 + 8)
    # our paths: a few chunk x V buffers (student, source, softmaxes, gradient), top-K of both sources,
    # float32 gradient accumulators, then the gradients in the input dtype; bf16/fp16 heads on the PyTorch
    # path add one fp32 block of converted vocabulary rows (never a full fp32 copy of a head)
    block = CONVERT_BLOCK_BYTES if impl == "torch" and e < F32 else 0
    return 5 * min(chunk, s.n) * s.v * F32 + 2 * s.n * k * (F32 + 8) + fp32_grads + grads + block


def prediction_note(impl: str, mode: str) -> str:
    """One line saying what the prediction counts, for the report."""
    if mode == "stats":
        return {
            "naive": "2 N.V logits + 2 N.V fp32 log-softmax",
            "floor_alg": "2 N.V GEMM outputs",
            "triton": "N.splits.CAP candidate lists + N.splits.K keys + 2 N.K top-K",
            "triton_nok": "3 N.splits fp32 partials",
            "triton_2pass": "512.V fp32 chunk logits + N.splits.CAP lists + N.splits.K keys + 2 N.K top-K",
            "triton_cuda": "512.V fp32 chunk logits + 2 N.K top-K",
            "torch+ext": "1 chunk.V fp32 + 2 N.K top-K",
        }.get(impl, "2 chunk.V fp32 + 2 N.K top-K")
    return {
        "reference": "3 N.V logits + 4 N.V fp64 (log-softmax x3, grad) + grads",
        "naive": "3 N.V logits + 4 N.V fp32 (log-softmax x3, grad) + grads",
        "liger": "6 chunk.V fp32 (chunk 1024) + fp32 dW + grads",
        "liger_compiled": "6 chunk.V fp32 (chunk 1024) + fp32 dW + grads",
        "floor_5gemm": "3 N.V GEMM outputs + grads",
        "floor_alg": "2 N.V + 2 N_HT.V GEMM outputs + grads",
        "torch+ext": "max(4 chunk.V, 4 chunk.V + fp32 grads, fp32 grads + grads) + 2 N.K top-K",
    }.get(impl, "5 chunk.V fp32 + 2 N.K top-K + fp32 grads + grads (bf16 torch: + one 64 MiB fp32 block)")
