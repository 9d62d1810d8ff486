"""The autograd Function shared by the fused paths: gradients computed in the forward, attached here.

The fused paths know every per-token gradient once the loss is computed (closed forms), so they fold
them into d hidden / d weight / d bias during the forward pass, and the backward only scales them by
the incoming gradient of the scalar loss (recomputing would cost the full-vocabulary GEMMs again).

Precision: the paths hand over their fp32 (or float64) accumulators. For an fp16 tensor the gradient is
kept in fp32 and converted only after the scaling by grad_output: it carries the ~1/N reduction weight,
so converting first would flush small entries to zero that AMP's loss scaling (grad_output = 2^16 ...)
would have made representable. bf16 has fp32's exponent range, so bf16 (and fp32 / float64) gradients
are converted at once, which halves what is held between forward and backward.
"""

from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor


def _held(grad: Optional[Tensor], like: Optional[Tensor]) -> Optional[Tensor]:
    """What is kept until backward: the gradient in ``like``'s dtype, or in its own precision for fp16."""
    if grad is None or like is None or like.dtype == torch.float16:
        return grad
    return grad.to(like.dtype)


class AttachGrads(torch.autograd.Function):
    """forward(loss (), d_hidden|None, d_weight|None, d_bias|None, hidden, weight, bias) -> loss.

    The d_* tensors have the shapes of hidden (..., Hs), weight (V, Hs) and bias (V,), in those tensors'
    dtypes or in a wider one. Backward returns ``(grad_loss * d_*)`` converted to each tensor's dtype (the
    conversion after the product); it may run more than once (``retain_graph=True``): the saved gradients
    are kept until the graph is freed.
    """

    @staticmethod
    def forward(ctx, loss, d_hidden, d_weight, d_bias, hidden, weight, bias):  # noqa: D102
        ctx.grads = (d_hidden, d_weight, d_bias)
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (hidden, weight, bias))
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):  # noqa: D102
        scaled = [None if g is None else (g * grad_loss).to(dt) for g, dt in zip(ctx.grads, ctx.dtypes)]
        return (None, None, None, None, *scaled)


def attach_grads(loss: Tensor, d_hidden: Optional[Tensor], d_weight: Optional[Tensor], d_bias: Optional[Tensor],
                 hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The scalar ``loss`` made differentiable w.r.t. (hidden, weight, bias) with the given gradients.

    Pass the gradients in their accumulation precision (fp32 or float64), shaped like the tensors: they are
    converted to each tensor's dtype here (bf16 / fp32 / float64) or after the scaling in backward (fp16).
    """
    return AttachGrads.apply(loss, _held(d_hidden, hidden), _held(d_weight, weight), _held(d_bias, bias),
                             hidden, weight, bias)
