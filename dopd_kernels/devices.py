"""Device context of a loss call: the CUDA device Triton launches on, CUDA graph capture, autocast.

Shared by every path (single-process, vocabulary-parallel, the self-check), so that each rule lives in one place.
"""

from __future__ import annotations

import contextlib

import torch


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on ``device``: Triton launches on the current CUDA device and stream, which need not be the
    tensors' (tensors on cuda:1 while cuda:0 is current). A no-op off CUDA."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on the current stream (a host-side query, no sync)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast disabled for ``device``'s type while the loss computes: its inputs keep their dtypes and its
    own numerics apply (fp32 accumulation, fp32 / fp64 GEMMs), whatever region the caller runs it in; under
    autocast the PyTorch path's fp32 GEMMs would run in bf16 and its fp32 ``out=`` buffers meet bf16 results.
    A no-op when autocast is off for that device type."""
    try:
        enabled = torch.is_autocast_enabled(device.type)
    except (RuntimeError, TypeError):  # a device type autocast does not know: nothing to disable
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False) if enabled else contextlib.nullcontext()
