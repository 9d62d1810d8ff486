"""Logit post-processing of a model's head: a multiplier and a final soft-cap.

Some model families do not feed ``hidden @ W^T (+ b)`` to the softmax. Gemma 2 (and Gemma 3n, in its
text config) soft-caps the logits, ``cap * tanh(z / cap)``; Cohere multiplies them by ``logit_scale``,
Falcon-H1 by ``lm_head_multiplier``, Granite divides them by ``logits_scaling``. A loss that starts from
hidden states must do the same, or it trains on logits the model never produces.
:class:`LogitTransform` says what to do; every backend applies it right after the projection, before
the loss's temperature divides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class LogitTransform:
    """``z -> softcap * tanh(scale * z / softcap)`` when ``softcap`` is set, else ``z -> scale * z``.

    scale: a finite multiplier > 0 (Cohere's ``logit_scale``, Falcon-H1's ``lm_head_multiplier``,
        ``1 / logits_scaling`` for Granite).
    softcap: None, or a finite cap > 0 (Gemma 2's ``final_logit_softcapping``), applied after ``scale``.
    A logit of -inf (a masked vocabulary entry) stays -inf: it never gains probability through the cap.
    """

    scale: float = 1.0
    softcap: Optional[float] = None

    def __post_init__(self) -> None:
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not (
                math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"LogitTransform.scale must be a finite number > 0, got {self.scale!r}")
        if self.softcap is not None and (isinstance(self.softcap, bool) or not isinstance(self.softcap, (int, float))
                                         or not (math.isfinite(self.softcap) and self.softcap > 0)):
            raise ValueError(f"LogitTransform.softcap must be None or a finite number > 0, got {self.softcap!r}")
        object.__setattr__(self, "scale", float(self.scale))
        if self.softcap is not None:
            object.__setattr__(self, "softcap", float(self.softcap))

    @property
    def is_identity(self) -> bool:
        """True when the transform changes nothing (scale 1, no cap)."""
        return self.scale == 1.0 and self.softcap is None

    def apply(self, z: Tensor) -> Tensor:
        """The transformed logits (differentiable; -inf stays -inf)."""
        if self.softcap is None:
            return z if self.scale == 1.0 else z * self.scale
        capped = torch.tanh(z * (self.scale / self.softcap)) * self.softcap
        return torch.where(z == float("-inf"), z, capped)


IDENTITY = LogitTransform()


def as_transform(name: str, value: Optional[LogitTransform]) -> LogitTransform:
    """None -> the identity; a LogitTransform -> itself; anything else is a ValueError naming ``name``."""
    if value is None:
        return IDENTITY
    if not isinstance(value, LogitTransform):
        raise ValueError(f"{name} must be a LogitTransform or None, got {type(value).__name__}")
    return value
