"""pytest configuration of the benchmark suite: size sets, the parametrization of cases, the session context.

Run: ``pytest bench --benchmark-only`` (add ``--benchmark-json=results.json`` for the report).
Sizes: ``--bench-sizes small|default|large`` or ``DOPD_BENCH_SIZES``; device: CUDA when available
(``DOPD_BENCH_DEVICE=cpu`` forces the CPU shapes).
"""

from __future__ import annotations

import tempfile
from typing import Iterator

import pytest

from bench.harness import BenchContext
from bench.shapes import SIZE_SETS, bench_device, resolve_size_set, suite_shapes


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register ``--bench-sizes``."""
    parser.addoption(
        "--bench-sizes", choices=SIZE_SETS, default=None,
        help="benchmark size set (default: $DOPD_BENCH_SIZES or 'default')",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Declare the marker that tells a test which suite, mode and implementations it covers."""
    config.addinivalue_line("markers", "bench_cases(suite, mode, impls): parametrize `case` by shape x impl")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``case`` as (shape, impl), shape outermost so each shape's inputs are built once in a row."""
    marker = metafunc.definition.get_closest_marker("bench_cases")
    if marker is None or "case" not in metafunc.fixturenames:
        return
    suite_name, _mode, impls = marker.args
    size_set = resolve_size_set(metafunc.config.getoption("--bench-sizes"))
    shapes = getattr(suite_shapes(bench_device(), size_set), suite_name)
    cases = [(shape, impl) for shape in shapes for impl in impls]
    metafunc.parametrize("case", cases, ids=[f"{impl}-{shape.id()}" for shape, impl in cases])


@pytest.fixture(scope="session")
def bench_ctx(request: pytest.FixtureRequest) -> Iterator[BenchContext]:
    """Session context: inputs built once per shape and saved (for the memory child processes) in a
    private temporary directory, removed at the end (hundreds of MB per shape)."""
    size_set = resolve_size_set(request.config.getoption("--bench-sizes"))
    with tempfile.TemporaryDirectory(prefix="dopd-bench-") as workdir:
        yield BenchContext(workdir, size_set)
