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

    # The chunked paths use the two in-place methods below, at the one point where each chunk's logits
    # are formed and the one point where a logit gradient is folded into the projection's gradients.
    # For the identity they do exactly what the code did before transforms existed (one multiply by
    # 1/tau, one per-row multiply of the gradient), so the common case costs nothing extra.

    def apply_(self, z: Tensor, inv_tau: float = 1.0, bias: Optional[Tensor] = None) -> Tensor:
        """In place on a fresh chunk of raw logits: ``z <- transform(z) * inv_tau``; returns ``z``.

        z: a finite product ``h W^T`` plus ``bias`` (broadcastable to z, or None): z's -inf entries are
        exactly the bias's, which stay -inf. No autograd (the chunked paths use closed-form gradients,
        see :meth:`chain_grad_`).
        """
        if self.softcap is None:
            factor = self.scale * inv_tau  # scale and temperature in one pass
            return z if factor == 1.0 else z.mul_(factor)
        z.mul_(self.scale / self.softcap).tanh_().mul_(self.softcap * inv_tau)
        # tanh(-inf) = -1 gave the masked entries the finite logit -softcap. Their places come from the
        # bias (V values per chunk), not from a pass over z before the tanh; no bias, no -inf.
        return z if bias is None else z.masked_fill_(torch.isneginf(bias), float("-inf"))

    @property
    def grad_needs_logits(self) -> bool:
        """Whether :meth:`chain_grad_` reads the transformed logits (only a soft-cap's derivative does)."""
        return self.softcap is not None

    def chain_grad_(self, dz: Tensor, logits: Optional[Tensor], inv_tau: float, row_weight: Tensor) -> Tensor:
        """In place: the gradient w.r.t. :meth:`apply_`'s output -> the gradient w.r.t. the raw logits.

        dz: (C, V) gradient w.r.t. ``transform(z) * inv_tau``, finite, 0 at -inf logits; logits: that
        output (read only for a soft-cap, may be None otherwise); row_weight: (C,) per-row factor folded
        in on the way (the reduction weights). d/dz [softcap tanh(scale z / softcap)] = scale (1 - tanh^2),
        with tanh = logits / (inv_tau softcap); a pure multiplier is one scalar, folded into the row factor.
        """
        dz.mul_((row_weight * (inv_tau * self.scale))[:, None])
        if self.softcap is None:
            return dz
        # dz (1 - a^2 logits^2), a = 1 / (inv_tau softcap), as dz + (-a^2) dz logits^2 in one pass. The
        # clamp keeps tanh^2 <= 1: a -inf logit (a masked entry, dz = 0) gets slope 0, not 0 * inf = NaN.
        a2 = (1.0 / (inv_tau * self.softcap)) ** 2
        sq = logits.square().clamp_max_(1.0 / a2)
        return dz.addcmul_(dz, sq, value=-a2)

IDENTITY = LogitTransform()


def as_transform(name: str, value: Optional[LogitTransform]) -> LogitTransform:
    """None -> the identity; a LogitTransform -> itself; anything else is a ValueError naming ``name``."""
    if value is None:
        return IDENTITY
    if not isinstance(value, LogitTransform):
        raise ValueError(f"{name} must be a LogitTransform or None, got {type(value).__name__}")
    return value
