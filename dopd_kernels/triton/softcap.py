"""Logit transforms (``transform.LogitTransform``) inside the kernels: one epilogue and its derivative.

Every kernel that forms logits ends them with ``z -> post * z`` (no soft-cap; ``post = scale / tau``: the
multiply by 1 / tau the kernels did before transforms existed, so the identity and pure multipliers run
the same compiled code with another scalar) or, when the model soft-caps (constexpr ``SOFTCAP``),
``z -> post * tanh(pre * z)`` with ``pre = scale / softcap``, ``post = softcap / tau``; a -inf logit (a
masked vocabulary entry, from a -inf bias) stays -inf. The gradient chains through
``d out / d z = pre * post * (1 - (out / post)^2)``: ``pre * post = scale / tau`` is one scalar, folded into
the per-row factor the kernels already apply, and the soft-cap adds the slope ``1 - (out / post)^2``,
clamped at 0 so that a -inf logit gets slope 0 (no inf * 0).

tanh is written out (fp32, no libdevice, so the same code runs on sm_90 and in the interpreter): an odd
Taylor polynomial to x^9 for |x| < 1/4 (truncation < 1e-8 relative), else ``(1 - e) / (1 + e)`` with
``e = exp(-2|x|)`` in [0, 1], which cannot overflow (|x| = inf gives e = 0, tanh = +-1) and loses no
relative precision there (1 - e >= 0.39). Both branches are evaluated (SIMT): ~22-32 SASS instructions per
logit on sm_90, 2 of them MUFU (exp2, reciprocal) (cost model: function.py).
"""

from __future__ import annotations

from typing import NamedTuple

import triton
import triton.language as tl

from ..transform import LogitTransform


class KernelTransform(NamedTuple):
    """A model's transform and the temperature as the kernels take them.

    softcap: the constexpr SOFTCAP. pre, post: the epilogue's runtime scalars (above). grad_scale: the
    transform's constant factor of the gradient with the temperature, ``scale / tau``.
    """

    softcap: bool
    pre: float
    post: float

    @property
    def grad_scale(self) -> float:
        """``scale / tau`` (= pre * post with a soft-cap, post without one)."""
        return self.pre * self.post

    @property
    def inv_post(self) -> float:
        """``1 / post``: soft-capped logit -> tanh, for the slope."""
        return 1.0 / self.post


def kernel_transform(transform: LogitTransform, inv_tau: float) -> KernelTransform:
    """The kernels' view of ``transform`` followed by the temperature's ``* inv_tau``."""
    if transform.softcap is None:
        return KernelTransform(False, 1.0, transform.scale * inv_tau)
    return KernelTransform(True, transform.scale / transform.softcap, transform.softcap * inv_tau)


@triton.jit
def tanh_f32(x):
    """tanh of fp32 ``x`` to a few ulp, finite for every finite or infinite x (see the module docstring)."""
    ax = tl.abs(x)
    x2 = x * x
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    e = tl.exp(-2.0 * ax)
    large = (1.0 - e) / (1.0 + e)
    t = tl.where(ax < 0.25, small, large)
    return tl.where(x < 0, -t, t)


@triton.jit
def transform_logits(z, pre, post, SOFTCAP: tl.constexpr):
    """The epilogue: ``post * z``, or ``post * tanh(pre * z)`` with -inf kept, for fp32 logits ``z``."""
    if SOFTCAP:
        out = tl.where(z == float("-inf"), float("-inf"), post * tanh_f32(z * pre))
    else:
        out = z * post
    return out


@triton.jit
def softcap_slope(out, inv_post):
    """``1 - tanh^2`` from an epilogue output (``tanh = out / post``), clamped to [0, 1]; 0 at -inf."""
    t = out * inv_post
    return tl.maximum(1.0 - t * t, 0.0)
