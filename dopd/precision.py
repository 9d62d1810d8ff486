"""Mixed precision: the one place that decides parameter, compute and frozen-model dtypes.

``--dtype bfloat16`` (or ``float16``) means mixed precision, as users expect from a trainer:
- the trained student keeps **fp32 master weights** and AdamW keeps fp32 state, so an update of
  lr x 1 moves a weight of any size (bf16 weights cannot move by 5e-6 once they exceed ~1e-3);
- its forwards and the rollouts run under ``torch.autocast`` in the compute dtype;
- the frozen teacher and a frozen privileged self are *stored* in the compute dtype (they never
  update, so they need no master copy);
- the loss receives every hidden state and projection in the compute dtype and accumulates in fp32
  (``routed_loss``'s own rule); it runs outside autocast, which would otherwise redo its fp32
  GEMMs in the low precision;
- fp16 adds a gradient scaler (bf16 has fp32's exponent range and needs none);
- checkpoints hold the fp32 masters, so ``--resume`` continues the exact run.
``--dtype float32`` turns all of this off.

Under FSDP2 (``fully_shard``) the same decision is expressed as :meth:`Precision.mp_policy`: the sharded
fp32 parameters are cast to the compute dtype for forward and backward and gradients are reduced in fp32;
autocast is then unnecessary (``autocast(..., enabled=False)``), everything else stays as above.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ContextManager, Optional

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """The dtype policy of one run, from ``--dtype`` (``float32`` | ``bfloat16`` | ``float16``)."""

    name: str = "float32"

    def __post_init__(self) -> None:
        if self.name not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.name!r}")

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of forwards, rollouts and the loss's inputs."""
        return DTYPES[self.name]

    @property
    def mixed(self) -> bool:
        """True for bf16/fp16 compute over fp32 masters."""
        return self.compute_dtype != torch.float32

    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype of the trained weights and the optimizer state: always fp32 (the masters)."""
        return torch.float32

    @property
    def frozen_dtype(self) -> torch.dtype:
        """The storage dtype of frozen models (teacher, frozen self, ``dopd eval``'s model)."""
        return self.compute_dtype

    def autocast(self, device: torch.device, enabled: Optional[bool] = None) -> ContextManager[Any]:
        """Autocast to the compute dtype (a no-op for float32 or ``enabled=False``, e.g. under FSDP2)."""
        on = self.mixed if enabled is None else enabled and self.mixed
        if not on:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.compute_dtype)

    def loss_input(self, tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """``tensor`` in the compute dtype (differentiable: gradients reach the fp32 master)."""
        return None if tensor is None else tensor.to(self.compute_dtype)

    def grad_scaler(self, device: torch.device) -> "torch.amp.GradScaler":
        """A loss scaler, enabled for fp16 only (its gradients underflow without one)."""
        return torch.amp.GradScaler(device.type, enabled=self.compute_dtype == torch.float16)

    def mp_policy(self) -> Any:
        """The FSDP2 ``MixedPrecisionPolicy`` of the same decision (fp32 gradient reduction)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
