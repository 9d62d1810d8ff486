"""The dopd ops (``torch.ops.dopd.*``, defined in ``csrc/ops.cpp``): Python signatures and fake kernels.

The fake (meta) kernels give the output shapes without data, so the ops trace under ``torch.compile`` and pass
``torch.library.opcheck``. They are registered when the library is loaded (``register_fakes``).
"""

from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor
OPS = ("row_stats", "full_divergence_", "topk_divergence")


def row_stats(logits: Tensor, targets: Tensor, k: int, scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per row of ``scale * logits``: log-sum-exp, target logit, top-``k`` values and ids, in one op.

    logits (C, V) float32 with unit column stride (a view of a wider buffer is fine); targets (C,) int64.
    Returns lse (C,), target_logit (C,) (NaN for an id outside [0, V)), topk_vals (C, k) descending with exact
    ties to the lower id, topk_idx (C, k) int64. A row with fewer than k entries above -inf is completed with
    its -inf entries, lowest ids first.
    """
    return torch.ops.dopd.row_stats(logits, targets, k, scale)


def full_divergence_(student: Tensor, source: Tensor, targets: Tensor, kind: str, beta: float, scale: float,
                     grad_scale: Tensor, softcap: float = 0.0) -> tuple[Tensor, Tensor]:
    """Per row: D = ``kind`` ("rkl" | "fkl" | "jsd" with ``beta``) between softmax(scale * student) and
    softmax(scale * source), and the student's log-prob of ``targets``.

    student, source (C, V) float32 (after the models' logit transforms); grad_scale (C,) float32. In place:
    ``student`` becomes ``grad_scale[:, None] * dD/d student`` (the factor ``scale`` included; with ``softcap`` > 0
    the student's logits are soft-capped ones and the gradient is taken before the cap); ``source`` is scratch.
    A transform's multiplier is a constant factor: fold it into grad_scale. Returns value (C,) and the
    student's target log-prob (C,).
    """
    return torch.ops.dopd.full_divergence_(student, source, targets, kind, beta, scale, grad_scale, softcap)


def topk_divergence(hidden: Tensor, rows: Tensor, weight: Tensor, bias: Optional[Tensor], idx: Tensor,
                    source_logits: Tensor, kind: str, beta: float, scale: float, grad_scale: Tensor,
                    hidden_grad: Optional[Tensor], weight_grad: Optional[Tensor], bias_grad: Optional[Tensor],
                    logit_scale: float = 1.0, softcap: float = 0.0) -> Tensor:
    """Per token r = rows[i] (R distinct ids into the N rows of hidden (N, H), idx and source_logits (N, K)): D between
    the student's softmax over the K ids ``idx[r]`` of ``scale * (hidden[r] @ weight[idx[r]].T + bias[idx[r]])`` and
    softmax(source_logits[r]).

    The model's logit transform (``LogitTransform(logit_scale, softcap)``; softcap 0: none) is applied to the
    student's logits inside, before ``scale``. Returns value (R,); adds the ``grad_scale``-weighted dD/d hidden,
    dD/d weight, dD/d bias into ``hidden_grad`` (N, H), ``weight_grad`` (V, H) and ``bias_grad`` (V,) when given.
    All float32; idx, rows int64.
    """
    return torch.ops.dopd.topk_divergence(hidden, rows, weight, bias, idx, source_logits, kind, beta, scale,
                                          grad_scale, hidden_grad, weight_grad, bias_grad, logit_scale, softcap)


def _row_stats_fake(logits, targets, k, scale=1.0):
    torch._check(logits.dim() == 2 and targets.dim() == 1, lambda: "dopd::row_stats: logits (C, V), targets (C,)")
    rows = logits.shape[0]
    return (logits.new_empty(rows), logits.new_empty(rows), logits.new_empty(rows, k),
            logits.new_empty(rows, k, dtype=torch.int64))


def _full_divergence_fake(student, source, targets, kind, beta, scale, grad_scale, softcap=0.0):
    torch._check(student.shape == source.shape, lambda: "dopd::full_divergence_: student and source shapes differ")
    rows = student.shape[0]
    return student.new_empty(rows), student.new_empty(rows)


def _topk_divergence_fake(hidden, rows, weight, bias, idx, source_logits, kind, beta, scale, grad_scale, hidden_grad,
                          weight_grad, bias_grad, logit_scale=1.0, softcap=0.0):
    torch._check(idx.shape == source_logits.shape, lambda: "dopd::topk_divergence: idx and source_logits differ")
    torch._check(idx.shape[0] == hidden.shape[0], lambda: "dopd::topk_divergence: idx needs a row per hidden row")
    return hidden.new_empty(rows.shape[0])


_registered = False


def register_fakes() -> None:
    """Register the fake kernels (once, after the library defined the ops)."""
    global _registered
    if _registered:
        return
    torch.library.register_fake("dopd::row_stats")(_row_stats_fake)
    torch.library.register_fake("dopd::full_divergence_")(_full_divergence_fake)
    torch.library.register_fake("dopd::topk_divergence")(_topk_divergence_fake)
    _registered = True
