"""The extension's CUDA sources compile for Hopper (sm_90) without a GPU, and register a CUDA kernel per op.

csrc/cuda/*.cu are standalone CUDA translation units (no torch header: raw pointers and launchers), so nvcc
compiles them here as it would in a CUDA build; csrc/cuda/ops_cuda.cpp (the torch glue) is host C++ that
needs no CUDA header, so it compiles against this CPU torch's headers. Both are linked with libcudart into a
probe library that a child process loads beside the CPU build: every op must then have a CUDA kernel.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from torch.utils import cpp_extension

from _ext import require_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
KERNELS = ("row_stats_kernel", "full_divergence_kernel", "topk_divergence_kernel")


def _cuda_home() -> str:
    """A CUDA toolkit with nvcc and libcudart ($CUDA_HOME, the one behind nvcc on PATH, /usr/local/cuda)."""
    nvcc = shutil.which("nvcc")
    for home in (os.environ.get("CUDA_HOME"), nvcc and os.path.dirname(os.path.dirname(os.path.realpath(nvcc))),
                 "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.isdir(os.path.join(home, "lib64")):
            return home
    pytest.skip("no CUDA toolkit (nvcc and lib64/libcudart) found")


def _run(cmd: list, timeout: int = 240) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout + done.stderr


def test_cuda_sources_compile_for_sm90_and_register(tmp_path):
    cuda_home = _cuda_home()
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    glue_o, probe = tmp_path / "ops_cuda.o", tmp_path / "dopd_cuda_probe.so"
    sources = sorted(f for f in os.listdir(os.path.join(CSRC, "cuda")) if f.endswith(".cu"))
    objects, ptxas = [], ""
    for name in sources:
        objects.append(str(tmp_path / name.replace(".cu", ".o")))
        ptxas += _run([nvcc, "-gencode", "arch=compute_90,code=sm_90", "-O3", "-DNDEBUG", "-std=c++17", "-Xcompiler",
                       "-fPIC", "--resource-usage", "-c", os.path.join(CSRC, "cuda", name), "-o", objects[-1]])
    for name in KERNELS:
        entry = re.search(rf"Compiling entry function '\w*{name}\w*' for 'sm_90'", ptxas)
        assert entry, f"{name} was not compiled for sm_90:\n{ptxas[-3000:]}"
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    _run(["c++", "-std=c++20", "-O2", "-fPIC", "-D_GLIBCXX_USE_CXX11_ABI=" + str(int(torch._C._GLIBCXX_USE_CXX11_ABI)),
          *includes, "-c", os.path.join(CSRC, "cuda", "ops_cuda.cpp"), "-o", str(glue_o)])
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    _run(["c++", "-shared", str(glue_o), *objects, "-o", str(probe), f"-L{torch_lib}", "-lc10", "-ltorch_cpu",
          f"-L{os.path.join(cuda_home, 'lib64')}", "-lcudart", f"-Wl,-rpath,{os.path.join(cuda_home, 'lib64')}"])
    require_ext()  # the CPU build defines the ops; the probe adds their CUDA kernels
    check = ("import sys, torch, dopd_kernels.ext as e\n"
             "assert e.load()\n"
             f"torch.ops.load_library({str(probe)!r})\n"
             "missing = [op for op in e.ops.OPS if not torch._C._dispatch_has_kernel_for_dispatch_key('dopd::' + op, 'CUDA')]\n"
             "print('missing', missing)\n")
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "missing []" in out.stdout
