"""The autograd Function shared by the fused paths: gradients computed in the forward, attached here.

The fused paths know every per-token gradient once the loss is computed (closed forms), so they fold
them into d hidden / d weight / d bias during the forward pass, and the backward only scales them by
the incoming gradient of the scalar loss (recomputing would cost the full-vocabulary GEMMs again).
"""

from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor


class AttachGrads(torch.autograd.Function):
    """forward(loss (), d_hidden|None, d_weight|None, d_bias|None, hidden, weight, bias) -> loss.

    The d_* tensors have the shapes and dtypes of hidden (..., Hs), weight (V, Hs) and bias (V,).
    Backward returns ``grad_loss * d_*`` for (hidden, weight, bias); it may run more than once
    (``retain_graph=True``): the saved gradients are kept until the graph is freed.
    """

    @staticmethod
    def forward(ctx, loss, d_hidden, d_weight, d_bias, hidden, weight, bias):  # noqa: D102
        ctx.grads = (d_hidden, d_weight, d_bias)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):  # noqa: D102
        scaled = [None if g is None else (g * grad_loss).to(g.dtype) for g in ctx.grads]
        return (None, None, None, None, *scaled)


def attach_grads(loss: Tensor, d_hidden: Optional[Tensor], d_weight: Optional[Tensor], d_bias: Optional[Tensor],
                 hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The scalar ``loss`` made differentiable w.r.t. (hidden, weight, bias) with the given gradients."""
    return AttachGrads.apply(loss, d_hidden, d_weight, d_bias, hidden, weight, bias)
