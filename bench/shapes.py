"""Benchmark shapes: which (N, Hs, Ht, V, dtype) each suite runs, per device and size set.

The size set comes from ``--bench-sizes`` or the ``DOPD_BENCH_SIZES`` environment variable:
``small`` (a smoke run in well under a minute), ``default`` (the issue's shapes), ``large`` (adds the
largest N to the scaling sweep and bigger comparison points).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace

import torch

SIZE_SETS = ("small", "default", "large")
ENV_VAR = "DOPD_BENCH_SIZES"


@dataclass(frozen=True)
class BenchShape:
    """One problem size: N tokens, student/teacher hidden sizes, vocabulary, dtype name, device type."""

    n: int
    hs: int
    ht: int
    v: int
    dtype: str  # "float32" | "bfloat16" | "float16"
    device: str  # "cpu" | "cuda"

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype named by ``dtype``."""
        return getattr(torch, self.dtype)

    @property
    def itemsize(self) -> int:
        """Bytes per element of ``dtype``."""
        return torch.empty((), dtype=self.torch_dtype).element_size()

    def id(self) -> str:
        """A short id for pytest parametrization and the report."""
        return f"N{self.n}-Hs{self.hs}-Ht{self.ht}-V{self.v}-{self.dtype}"

    def as_dict(self) -> dict:
        """Plain dict (for extra_info and the memory child's command line)."""
        return asdict(self)


@dataclass(frozen=True)
class SuiteShapes:
    """The shapes of the three suites: the head-to-head comparison and the two scaling sweeps."""

    compare: tuple[BenchShape, ...]
    scaling_n: tuple[BenchShape, ...]  # our paths and the floors only; N values not already in `compare`
    scaling_v: tuple[BenchShape, ...]  # our paths only: memory flat in V beyond the chunk
    dtypes: tuple[BenchShape, ...] = ()  # the PyTorch path on one shape in float32 and in bfloat16


def resolve_size_set(option: str | None) -> str:
    """The size set: the command-line option wins over the environment variable; default ``default``."""
    name = option or os.environ.get(ENV_VAR) or "default"
    if name not in SIZE_SETS:
        raise ValueError(f"{ENV_VAR}/--bench-sizes must be one of {SIZE_SETS}, got {name!r}")
    return name


def bench_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``; ``DOPD_BENCH_DEVICE`` forces one."""
    forced = os.environ.get("DOPD_BENCH_DEVICE")
    if forced:
        return forced
    return "cuda" if torch.cuda.is_available() else "cpu"


def _sweep(base: BenchShape, field: str, values: tuple[int, ...]) -> tuple[BenchShape, ...]:
    return tuple(replace(base, **{field: value}) for value in values)


def suite_shapes(device: str, size_set: str) -> SuiteShapes:
    """The shapes for ``device`` ("cpu"/"cuda") and ``size_set`` ("small"/"default"/"large")."""
    if device == "cuda":
        base = BenchShape(n=8192, hs=2048, ht=4096, v=151936, dtype="bfloat16", device="cuda")
        compare_n = {"small": (4096,), "default": (4096, 8192, 16384), "large": (4096, 8192, 16384, 32768)}
        scaling_n = {"small": (), "default": (2048,), "large": (2048, 32768, 65536)}
        scaling_v = {"small": (), "default": (32768,), "large": (32768, 65536, 262144)}
    else:
        if size_set == "small":
            base = BenchShape(n=256, hs=128, ht=256, v=4096, dtype="float32", device=device)
        else:
            base = BenchShape(n=2048, hs=512, ht=1024, v=32768, dtype="float32", device=device)
        compare_n = {"small": (128, 256), "default": (512, 2048), "large": (512, 2048, 4096)}
        # 512 and 2048 come from the comparison suite; the report fits all points of one impl together.
        # default: N = 512, 1024, 2048 (with the comparison suite) keeps the whole run near 10 minutes
        # on 2 cores; bench/RESULTS.md also holds a 4096 point from a run with it (DOPD_BENCH_SIZES=large).
        scaling_n = {"small": (512,), "default": (1024,), "large": (1024, 4096, 8192)}
        scaling_v = {"small": (8192,), "default": (8192, 65536), "large": (8192, 65536, 131072)}
    # The V sweep runs at the middle comparison N so that its V = base.v point is shared with `compare`.
    v_base = replace(base, n=compare_n[size_set][-1] if size_set == "small" else base.n)
    if device == "cuda":
        v_base = replace(base, n=8192)
    # bf16 beside fp32 on the PyTorch path: Qwen2.5-0.5B's head as the student, 1.5B's as the teacher
    # (V=151936, Hs=896, Ht=1536), where a full fp32 copy of the bf16 heads would be 1.4 GiB.
    qwen = BenchShape(n=512 if device == "cpu" else 8192, hs=896, ht=1536, v=151936, dtype="float32", device=device)
    if size_set == "small":
        qwen = replace(qwen, n=256, v=32768)
    return SuiteShapes(
        compare=_sweep(base, "n", compare_n[size_set]),
        scaling_n=_sweep(base, "n", scaling_n[size_set]),
        scaling_v=_sweep(v_base, "v", scaling_v[size_set]),
        dtypes=_sweep(qwen, "dtype", ("float32", "bfloat16")),
    )
