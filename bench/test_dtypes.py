"""The PyTorch path with bf16 inputs beside fp32 on the same values: time and peak extra memory.

bf16 heads are converted to fp32 one block of vocabulary rows at a time inside the GEMMs
(``dopd_kernels.chunked_stats.vocab_blocks``), so the extra memory should be the fp32 run's minus the
smaller input-dtype gradients plus one 64 MiB block -- not plus an fp32 copy of every head.
"""

from __future__ import annotations

import pytest

from bench.harness import run_case


@pytest.mark.bench_cases("dtypes", "fwdbwd", ("torch",))
def test_torch_path_dtypes(benchmark, bench_ctx, case) -> None:
    """Loss forward + backward on the PyTorch path, float32 and bfloat16 inputs."""
    shape, impl = case
    run_case(benchmark, bench_ctx, impl, "fwdbwd", shape, suite="dtypes")
