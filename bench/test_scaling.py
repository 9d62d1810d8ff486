"""Scaling of our paths: time and memory over N (with the algorithmic floor), memory over V.

The comparison suite's points (same Hs, Ht, V) join these in the report's fits, so N values already
benchmarked there are not repeated here.
"""

from __future__ import annotations

import pytest

from bench.harness import run_case
from bench.impls import OURS


@pytest.mark.bench_cases("scaling_n", "fwdbwd", OURS + ("floor_alg",))
def test_scaling_tokens(benchmark, bench_ctx, case) -> None:
    """Our paths over N: time and memory should grow linearly in N."""
    shape, impl = case
    run_case(benchmark, bench_ctx, impl, "fwdbwd", shape, suite="scaling_n")


@pytest.mark.bench_cases("scaling_v", "fwdbwd", OURS)
def test_scaling_vocab(benchmark, bench_ctx, case) -> None:
    """Our paths over V at fixed N: memory grows only through chunk x V buffers and the V x Hs gradient."""
    shape, impl = case
    run_case(benchmark, bench_ctx, impl, "fwdbwd", shape, suite="scaling_v")
