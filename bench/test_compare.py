"""Head-to-head on the same tensors: full logits, Liger, the GEMM floors and our paths (forward+backward),
and the routing statistics pass alone."""

from __future__ import annotations

import pytest

from bench.harness import run_case
from bench.impls import FWDBWD_IMPLS, STATS_IMPLS


@pytest.mark.bench_cases("compare", "fwdbwd", FWDBWD_IMPLS)
def test_forward_backward(benchmark, bench_ctx, case) -> None:
    """Loss forward + backward into the student's hidden states and output projection."""
    shape, impl = case
    run_case(benchmark, bench_ctx, impl, "fwdbwd", shape, suite="compare")


@pytest.mark.bench_cases("compare", "stats", STATS_IMPLS)
def test_statistics_pass(benchmark, bench_ctx, case) -> None:
    """Self and teacher statistics (target log-prob, top-K) and the routing decision, without the loss."""
    shape, impl = case
    run_case(benchmark, bench_ctx, impl, "stats", shape, suite="compare")
