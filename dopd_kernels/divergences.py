"""The divergences of the route table, on log-probabilities: one definition shared by every path.

All functions take ``ls`` (the student's log-probabilities) and ``lt`` (the source's), shaped (..., S)
over the same support of size S and each normalized over it, and reduce over the last dim.

    rkl = KL(S || src)  = sum s (ls - lt)
    fkl = KL(src || S)  = sum t (lt - ls)
    jsd = beta KL(src || M) + (1 - beta) KL(S || M),  M = beta src + (1 - beta) S   (TRL's convention)

``divergence_and_grad`` also returns the gradient with respect to the student's *logits* z, where
ls = log_softmax(z). All three share the form  dz = s * (g - <s, g>)  with g = dD/ds:
    rkl: g = ls - lt           -> dz = s (ls - lt - rkl)
    fkl: g = -t / s            -> dz = s - t
    jsd: g = (1 - beta)(ls - lm) -> dz = (1 - beta) s (ls - lm - KL(S || M))
The fused paths use these closed forms; the reference differentiates ``divergence`` with autograd, so
the tests compare two independent derivations.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

Tensor = torch.Tensor


def _plogratio(logp: Tensor, logq: Tensor) -> Tensor:
    """p * (log p - log q) with the 0 * log 0 = 0 convention (p = exp(logp)).

    The difference is masked *before* the product too: with logp = -inf, autograd of a plain
    where(p > 0, p * diff, 0) would send 0 * inf = NaN through the branch it did not take.
    """
    p = logp.exp()
    live = p > 0
    diff = torch.where(live, logp - logq, torch.zeros_like(p))
    return torch.where(live, p * diff, torch.zeros_like(p))


def _log_mixture(ls: Tensor, lt: Tensor, beta: float, differentiable: bool = False) -> Tensor:
    """log(beta t + (1 - beta) s), stable even where both probabilities underflow.

    Where both are exactly 0 (-inf logits) the value is -inf; ``differentiable`` also keeps autograd
    finite there (logaddexp's derivative at (-inf, -inf) is NaN, and 0 * NaN is NaN).
    """
    a, b = lt + math.log(beta), ls + math.log1p(-beta)
    if not differentiable:
        return torch.logaddexp(a, b)
    dead = torch.isneginf(a) & torch.isneginf(b)
    safe = torch.logaddexp(torch.where(dead, 0.0, a), torch.where(dead, 0.0, b))
    return torch.where(dead, float("-inf"), safe)


def divergence(ls: Tensor, lt: Tensor, kind: str, beta: float = 0.5) -> Tensor:
    """Per-row divergence between student log-probs ``ls`` and source log-probs ``lt``.

    Shapes: ls, lt (..., S) -> (...). ``kind`` is "rkl", "fkl" or "jsd" (with ``beta`` in (0, 1)).
    """
    if kind == "rkl":
        return _plogratio(ls, lt).sum(-1)
    if kind == "fkl":
        return _plogratio(lt, ls).sum(-1)
    if kind == "jsd":
        lm = _log_mixture(ls, lt, beta, differentiable=True)
        return beta * _plogratio(lt, lm).sum(-1) + (1.0 - beta) * _plogratio(ls, lm).sum(-1)
    raise ValueError(f"divergence: unknown kind {kind!r}")


def _plogratio_(logp: Tensor, logq: Tensor, p: Tensor) -> Tensor:
    """``_plogratio`` into a fresh buffer with in-place steps (no autograd): 2 buffers instead of 5."""
    return torch.sub(logp, logq).mul_(p).masked_fill_(p == 0, 0.0)


def divergence_and_grad(ls: Tensor, lt: Tensor, kind: str, beta: float = 0.5,
                        reduce_rows: Optional[Callable[[Tensor], Tensor]] = None) -> tuple[Tensor, Tensor]:
    """The divergence (..., ) and its gradient (..., S) with respect to the student's logits.

    ``ls`` must be log_softmax of the student's logits over the support (so the gradient of the
    normalisation is included). Computed without autograd, in the dtype of ``ls``, with in-place
    steps: the fused paths call it on C x V chunks, where every extra buffer is chunk-sized.
    ``reduce_rows``: when the support is split over ranks (vocabulary-parallel), a function that sums
    the per-row partial sums (a tensor of any shape) over the ranks; the value and the terms of the
    gradient that need a sum over the whole support use its result, every per-entry term stays local.
    """
    total = reduce_rows or (lambda x: x)
    s = ls.exp()
    if kind == "rkl":
        grad = _plogratio_(ls, lt, s)  # s (ls - lt), 0 where s = 0
        value = total(grad.sum(-1))
        # s (ls - lt - value) = grad - s * value; 0 where s = 0
        return value, grad.sub_(s * value.unsqueeze(-1))
    if kind == "fkl":
        value = total(_plogratio_(lt, ls, lt.exp()).sum(-1))
        return value, s.sub_(lt.exp())
    if kind == "jsd":
        lm = _log_mixture(ls, lt, beta)
        kl_tm = _plogratio_(lt, lm, lt.exp()).sum(-1)
        # ls - lm, in lm's buffer; finite unless ls = -inf (a -inf logit: a masked vocabulary entry),
        # where s = 0 and the entry contributes nothing.
        d_sm = lm.neg_().add_(ls).masked_fill_(s == 0, 0.0)
        kl_sm = (s * d_sm).sum(-1)
        if reduce_rows is not None:  # both sums in one reduction
            kl_tm, kl_sm = reduce_rows(torch.stack([kl_tm, kl_sm])).unbind(0)
        value = beta * kl_tm + (1.0 - beta) * kl_sm
        grad = d_sm.sub_(kl_sm.unsqueeze(-1)).mul_(s).mul_(1.0 - beta)
        return value, grad
    raise ValueError(f"divergence: unknown kind {kind!r}")


def sampled_pg(student_logprob: Tensor, source_logprob: Tensor) -> Tensor:
    """The single-sample reverse-KL policy-gradient loss at the sampled token.

    loss = (l_S - l_src).detach() * l_S: its value is not a divergence, its gradient is the per-token
    advantage form of vanilla OPD (tinker-cookbook). Shapes: (...) -> (...).
    """
    return (student_logprob - source_logprob).detach() * student_logprob
