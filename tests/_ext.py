"""Shared by the extension tests: the compiled ops (built into the cache once, ~1 minute on 2 cores) and devices."""

from __future__ import annotations

import shutil

import pytest
import torch

import dopd_kernels.ext as ext


def require_ext():
    """The loaded extension module, building it first if the cache has no build (a failed build fails the test)."""
    if not ext.is_available():
        if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
            pytest.skip("no C++ compiler on this machine: the extension cannot be built")
        ext.build()
        assert ext.load(), "the extension built but did not load"
    return ext


def devices() -> list[str]:
    """CPU, and CUDA when a GPU is visible (skipped there if the build has no CUDA kernels)."""
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def require_device(device: str) -> None:
    """Skip a CUDA case when the loaded build has no CUDA kernels (torch without CUDA, or no nvcc at build time)."""
    if device == "cuda" and not ext.has_cuda():
        pytest.skip("the extension was built without CUDA kernels (no nvcc?)")
