"""The optional compiled extension (``csrc/``): the PyTorch path's per-chunk epilogues as ``torch.library`` ops.

    python -m dopd_kernels.ext build      # compile once into ~/.cache/dopd/ext (about a minute on 2 cores)

Ops (namespace ``dopd``; CPU kernels in C++ with ``at::vec`` and ATen's OpenMP pool, CUDA kernels when torch
has CUDA and nvcc is found, fake kernels for ``torch.compile``): ``row_stats`` (log-sum-exp, target logit and
exact top-K of a chunk of logits in one pass), ``full_divergence_`` (JS/rKL/fKL value and logit gradient of a
chunk, in place), ``topk_divergence`` (the top-K routes: K projection rows per token, value, d hidden, d W).

Importing this module loads a cached build if there is one (``DOPD_EXT=0``: never). ``is_available()`` says
whether the ops are loaded; the loss calls them only where ``usable(tensor)`` (loaded, not disabled by
``DOPD_EXT=0`` or ``forced(False)``, float32, a device the build has kernels for) and runs its torch code
otherwise, so the package works the same without the extension.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from typing import Iterator, Optional

import torch

from . import ops
from .builder import BuildError, BuildSpec, build, cache_root, current_spec
from .ops import full_divergence_, row_stats, topk_divergence

__all__ = ["BuildError", "build", "cache_root", "enabled", "forced", "full_divergence_", "has_cuda", "is_available",
           "load", "row_stats", "topk_divergence", "usable"]

_loaded: Optional[BuildSpec] = None
_cuda_kernels = False
_override: Optional[bool] = None


def is_available() -> bool:
    """Whether the ops are loaded in this process."""
    return _loaded is not None


def has_cuda() -> bool:
    """Whether the loaded build has the CUDA kernels."""
    return _cuda_kernels


def enabled() -> bool:
    """Whether the loss may call the ops: loaded, and not switched off (``DOPD_EXT=0`` or ``forced(False)``)."""
    if _loaded is None:
        return False
    if _override is not None:
        return _override
    return os.environ.get("DOPD_EXT", "1") != "0"


def usable(t: torch.Tensor) -> bool:
    """Whether the ops apply to a float32 tensor ``t`` on its device (see ``enabled``)."""
    if t.dtype != torch.float32 or not enabled():
        return False
    return t.device.type == "cpu" or (t.device.type == "cuda" and _cuda_kernels)


@contextlib.contextmanager
def forced(on: bool) -> Iterator[None]:
    """Within the block, ``enabled()`` is ``on`` whatever ``DOPD_EXT`` says (when the library is loaded)."""
    global _override
    before, _override = _override, bool(on)
    try:
        yield
    finally:
        _override = before


def load(spec: Optional[BuildSpec] = None) -> bool:
    """Load the cached build (``build()`` first if there is none); True when the ops are loaded.

    A library that fails to load (e.g. built for another torch) gives a warning and False.
    """
    global _loaded, _cuda_kernels
    if _loaded is not None:
        return True
    spec = spec or current_spec()
    if not spec.ready():
        return False
    try:  # whatever goes wrong here (a library built for another torch, a damaged marker), the package works on
        with_cuda = bool(json.loads(spec.marker.read_text()).get("with_cuda"))
        torch.ops.load_library(str(spec.library))
    except Exception as err:  # noqa: BLE001 -- the import must not fail because of an optional build
        warnings.warn(f"dopd extension: could not load {spec.library} ({err!r}); using the torch code. "
                      "Rebuild with: python -m dopd_kernels.ext build --force")
        return False
    ops.register_fakes()
    _cuda_kernels = with_cuda
    _loaded = spec
    return True


if os.environ.get("DOPD_EXT", "1") != "0":
    load()
