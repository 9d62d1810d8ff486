"""Runs one benchmark case: inputs (cached per shape), route fractions, timing rounds, memory, extra_info."""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch

from bench.impls import build_runner, route_fractions, skip_reason
from bench.inputs import BenchInputs, build_inputs, load_inputs, save_inputs
from bench.memory import cpu_peak_extra_bytes, cuda_peak_extra_bytes
from bench.predict import predicted_bytes, predicted_flops, prediction_note
from bench.shapes import BenchShape

#: Seconds of timed rounds to aim for per case (at least MIN_ROUNDS rounds, at most MAX_ROUNDS).
ROUND_BUDGET_S = float(os.environ.get("DOPD_BENCH_ROUND_BUDGET_S", "8"))
MIN_ROUNDS, MAX_ROUNDS = 2, 10


@dataclass
class Prepared:
    """Inputs of one shape saved on disk (for the memory child), plus what our loss measured on them."""

    path: str
    fractions: dict[str, float]
    n_ht: int


class BenchContext:
    """Session state: one set of inputs per shape, built once, saved to ``workdir``; the last one kept loaded."""

    def __init__(self, workdir: str, size_set: str) -> None:
        self.workdir = workdir
        self.size_set = size_set
        self._prepared: dict[BenchShape, Prepared] = {}
        self._loaded: Optional[BenchInputs] = None

    def get(self, shape: BenchShape) -> tuple[BenchInputs, Prepared]:
        """Inputs of ``shape`` and their route fractions (building and saving them the first time)."""
        if self._loaded is not None and self._loaded.shape == shape:
            return self._loaded, self._prepared[shape]
        self._loaded = None
        gc.collect()
        if shape in self._prepared:
            prep = self._prepared[shape]
            x = load_inputs(prep.path) if shape.device == "cpu" else build_inputs(shape)
        else:
            x = build_inputs(shape)
            fractions = route_fractions(x)
            n_ht = int(round(fractions.get("frac/HT", 0.0) * shape.n))
            path = os.path.join(self.workdir, f"inputs-{shape.id()}.pt")
            if shape.device == "cpu":
                save_inputs(x, path)
            prep = self._prepared[shape] = Prepared(path, fractions, n_ht)
        self._loaded = x
        return x, prep


def max_tokens(impl: str, device: str, size_set: str) -> Optional[int]:
    """Largest N an implementation is run at (full-logits paths need N x V memory; None = no limit)."""
    if size_set == "large":
        return None
    if device == "cuda":
        return {"reference": 4096, "naive": 8192}.get(impl)
    # float64 full logits: ~10 GB and tens of seconds at N=2048 on CPU.
    return {"reference": 512}.get(impl)


def _timed(fn: Callable[[], object], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_case(benchmark, ctx: BenchContext, impl: str, mode: str, shape: BenchShape, suite: str) -> None:
    """Benchmark ``impl`` in ``mode`` on ``shape`` and record memory, predictions and routing in extra_info."""
    reason = skip_reason(impl, shape.device)
    if reason:
        pytest.skip(reason)
    limit = max_tokens(impl, shape.device, ctx.size_set)
    if limit is not None and shape.n > limit:
        pytest.skip(f"{impl} materializes N x V logits: run only up to N={limit} (DOPD_BENCH_SIZES=large for all)")

    x, prep = ctx.get(shape)
    run = build_runner(impl, mode, x, prep.n_ht)
    sync = (lambda: torch.cuda.synchronize()) if shape.device == "cuda" else (lambda: None)

    def call() -> None:
        run()
        sync()

    load_before = os.getloadavg()[0]
    try:
        # Warm-up: compilation (torch.compile, Triton) and lazy initialisation; the second call of a
        # compiled path gives the per-call estimate that sizes the number of rounds.
        estimate = _timed(run, shape.device)
        x.zero_grads()
        if impl == "liger_compiled" or shape.device == "cuda":
            estimate = _timed(run, shape.device)
            x.zero_grads()
        rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, int(ROUND_BUDGET_S / max(estimate, 1e-6))))
        benchmark.pedantic(call, setup=x.zero_grads, rounds=rounds, iterations=1, warmup_rounds=0)
        if shape.device == "cuda":
            memory = {"peak_extra_bytes": cuda_peak_extra_bytes(run, x.zero_grads), "mem_method": "cuda.max_memory_allocated"}
        else:
            memory = cpu_peak_extra_bytes(prep.path, impl, mode, prep.n_ht, full_warmup=impl == "liger_compiled")
    except torch.cuda.OutOfMemoryError:
        x.zero_grads()
        gc.collect()
        torch.cuda.empty_cache()
        pytest.skip(f"{impl} ran out of GPU memory at {shape.id()}")
    finally:
        x.zero_grads()

    benchmark.group = f"{suite} {mode} {shape.id()}"
    benchmark.extra_info.update(
        impl=impl, mode=mode, suite=suite, **shape.as_dict(), rounds=rounds,
        **memory,
        pred_bytes=predicted_bytes(impl, mode, shape, prep.n_ht),
        pred_flops=predicted_flops(impl, mode, shape, prep.n_ht),
        pred_note=prediction_note(impl, mode),
        n_ht=prep.n_ht, **prep.fractions,
        loadavg_before=load_before, loadavg_after=os.getloadavg()[0], cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(), torch_version=torch.__version__,
    )
