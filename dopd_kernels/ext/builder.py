"""Just-in-time build of the extension in ``csrc/`` into a cache directory, keyed by everything that shapes it.

The key hashes the sources, the compiler flags, torch's and Python's versions, the CPU instruction set
(``torch.backends.cpu.get_cpu_capability()``: the kernels use ``at::vec`` at that width) and, for a CUDA build,
CUDA's version and the target architectures. A build writes ``dopd_ext.so`` and then a ``ready`` marker, so a
later import loads only complete builds; the compiler's output goes to ``build.log`` beside them. The compile
runs in a child process (``_compile.py``: ``torch.utils.cpp_extension.load`` with ninja), so a failing build
leaves the calling process untouched.

Cache root: ``$DOPD_EXT_CACHE``, else ``$XDG_CACHE_HOME/dopd/ext``, else ``~/.cache/dopd/ext``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

NAME = "dopd_ext"
#: The sources, next to the package in a checkout or an editable install.
SOURCE_DIR = Path(__file__).resolve().parents[2] / "csrc"
BUILD_TIMEOUT_S = 1800


class BuildError(RuntimeError):
    """The extension did not build; the message names the compiler log."""


def cache_root() -> Path:
    """Where builds are kept (see the module docstring)."""
    if os.environ.get("DOPD_EXT_CACHE"):
        return Path(os.environ["DOPD_EXT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dopd" / "ext"


def _cpu_flags() -> list[str]:
    """at::vec's instruction set: the one torch itself dispatches to on this CPU (x86), else the default."""
    capability = torch.backends.cpu.get_cpu_capability()
    if platform.machine().lower() in ("x86_64", "amd64"):
        if capability == "AVX512":
            return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
                    "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
        if capability == "AVX2":
            return ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return ["-DCPU_CAPABILITY=DEFAULT"]


def _openmp_flags() -> list[str]:
    """-fopenmp where torch itself runs on OpenMP (Linux wheels): without it at::parallel_for compiles to a
    serial loop (ATen's INTRA_OP_PARALLEL is off). The library then links torch's libgomp.so.1, already loaded
    by ``import torch``, so one OpenMP runtime and torch's thread count serve both."""
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        return ["-fopenmp"]
    return []


def _nvcc() -> Optional[str]:
    """nvcc of CUDA_HOME (as torch.utils.cpp_extension finds it), or None."""
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return None


def _cuda_archs() -> str:
    """The architectures nvcc compiles for, as a key: TORCH_CUDA_ARCH_LIST, else "native" (torch then builds for the
    visible GPUs; not queried here, so that importing the package does not initialize CUDA). A cache shared by
    machines with different GPUs should set TORCH_CUDA_ARCH_LIST."""
    return os.environ.get("TORCH_CUDA_ARCH_LIST") or "native"


@dataclass(frozen=True)
class BuildSpec:
    """One build: sources, flags, whether it has the CUDA kernels, and where it lives."""

    source_dir: Path
    sources: tuple[str, ...]  # relative to source_dir
    cflags: tuple[str, ...]
    cuda_cflags: tuple[str, ...]
    with_cuda: bool
    key: str
    directory: Path

    @property
    def library(self) -> Path:
        """The shared library (loaded with ``torch.ops.load_library``)."""
        return self.directory / f"{NAME}.so"

    @property
    def log(self) -> Path:
        """The compiler's output of the last build attempt."""
        return self.directory / "build.log"

    @property
    def marker(self) -> Path:
        """Written after a successful build, with its facts (JSON)."""
        return self.directory / "ready"

    def ready(self) -> bool:
        """Whether a complete build is in the cache."""
        return self.marker.exists() and self.library.exists()


def current_spec(source_dir: Optional[Path] = None, cuda: Optional[bool] = None) -> BuildSpec:
    """The build for this machine. ``cuda``: None = CUDA kernels when torch has CUDA and nvcc is found."""
    source_dir = Path(source_dir or SOURCE_DIR)
    if cuda is None:
        cuda = torch.version.cuda is not None and _nvcc() is not None
    found = sorted(p.relative_to(source_dir).as_posix() for p in source_dir.rglob("*") if p.is_file())
    found = [s for s in found if cuda or not s.startswith("cuda/")]  # csrc/cuda/: the CUDA kernels and glue
    headers = [s for s in found if s.endswith((".h", ".cuh"))]
    sources = [s for s in found if s.endswith((".cpp", ".cu"))]
    # no implicit FMA contraction: log_softmax must be exactly 0 - logsum at the max (the kernels' comments)
    cflags = ["-O3", "-DNDEBUG", "-ffp-contract=off", *_cpu_flags(), *_openmp_flags()]
    cuda_cflags = ["-O3", "-DNDEBUG"] if cuda else []
    digest = hashlib.sha256()
    for rel in sources + headers:
        digest.update(rel.encode() + b"\0" + (source_dir / rel).read_bytes() + b"\0")
    facts = [torch.__version__, str(torch.version.cuda), sys.version.split()[0], platform.machine(),
             os.environ.get("CXX", "c++"), *cflags, *cuda_cflags, _cuda_archs() if cuda else "cpu"]
    digest.update("\0".join(facts).encode())
    key = digest.hexdigest()[:16]
    return BuildSpec(source_dir, tuple(sources), tuple(cflags), tuple(cuda_cflags), cuda, key,
                     cache_root() / f"{NAME}-{key}")


def build(force: bool = False, verbose: bool = False, spec: Optional[BuildSpec] = None) -> BuildSpec:
    """Compile the extension into the cache (nothing to do when it is there already, unless ``force``).

    Raises BuildError naming the compiler log when the compiler (or ninja, or the load check) fails.
    """
    spec = spec or current_spec()
    if spec.ready() and not force:
        return spec
    if not spec.sources:
        raise BuildError(f"dopd extension: no C++ sources in {spec.source_dir}")
    spec.directory.mkdir(parents=True, exist_ok=True)
    with open(spec.directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process building the same key: wait for it
        if spec.ready() and not force:
            return spec
        spec.marker.unlink(missing_ok=True)
        if force:  # ninja would keep up-to-date objects: start from an empty directory
            for item in spec.directory.iterdir():
                if item.name != ".lock":
                    shutil.rmtree(item) if item.is_dir() else item.unlink()
        job = dict(name=NAME, sources=[str(spec.source_dir / s) for s in spec.sources], cflags=list(spec.cflags),
                   ldflags=[f for f in spec.cflags if f == "-fopenmp"], cuda_cflags=list(spec.cuda_cflags),
                   with_cuda=spec.with_cuda, directory=str(spec.directory))
        started = time.monotonic()
        with open(spec.log, "w") as log:
            try:
                done = subprocess.run([sys.executable, str(Path(__file__).with_name("_compile.py")), json.dumps(job)],
                                      stdout=log, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT_S)
                code = done.returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        if verbose:
            sys.stdout.write(spec.log.read_text())
        if code != 0 or not spec.library.exists():
            raise BuildError(f"dopd extension: the build failed (exit {code}); compiler log: {spec.log}")
        seconds = time.monotonic() - started
        # written whole, then renamed: an import in another process never reads half a marker
        partial = spec.marker.with_suffix(".tmp")
        partial.write_text(json.dumps(dict(key=spec.key, with_cuda=spec.with_cuda, seconds=round(seconds, 1),
                                           cflags=spec.cflags, torch=torch.__version__)))
        os.replace(partial, spec.marker)
    return spec


def clean(spec: Optional[BuildSpec] = None) -> None:
    """Remove the current build from the cache."""
    spec = spec or current_spec()
    shutil.rmtree(spec.directory, ignore_errors=True)
