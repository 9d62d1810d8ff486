"""The result object of every path: the loss, the per-token signals and cheap metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from .config import ROUTES, RouteConfig
from .devices import autocast_off
from .reduction import reduction_weights

Tensor = torch.Tensor


class RoutedLossOutput:
    """What ``routed_loss`` returns. Per-token fields are shaped like ``target_ids`` and detached.

    loss: scalar, differentiable w.r.t. the student's hidden states, weight and bias.
    per_token_loss: route weight x divergence (+ ce_weight x CE) per token; 0 where masked.
    route: int64, 0=LH 1=LL 2=HT 3=HS, -1 where masked.
    adv_gap, q_self, q_teacher: the routing signals |l_T - l_S|, exp(l_S), exp(l_T) (0 where masked).
    student_logprob: the trained student's log-prob of ``target_ids`` (temperature applied; 0 where
        masked). The fused paths compute it on first access for tokens whose route did not need the
        student's full softmax (one extra no-grad pass over those tokens); reading it after the
        student's weights were changed in place (an optimizer step) raises instead of answering wrong.
    thresholds: 0-d tensors: the means of the normalized kept signals ("*_bar") and the trim cutoffs.
    """

    def __init__(
        self,
        *,
        loss: Tensor,
        per_token_loss: Tensor,
        route: Tensor,
        adv_gap: Tensor,
        q_self: Tensor,
        q_teacher: Tensor,
        student_logprob: Union[Tensor, Callable[[], Tensor]],
        thresholds: Optional[dict[str, Tensor]] = None,
        watched: Sequence[Tensor] = (),
    ) -> None:
        self.loss = loss
        self.per_token_loss = per_token_loss
        self.route = route
        self.adv_gap = adv_gap
        self.q_self = q_self
        self.q_teacher = q_teacher
        self.thresholds = dict(thresholds or {})
        self._logprob: Optional[Tensor] = student_logprob if isinstance(student_logprob, Tensor) else None
        self._logprob_fn = None if isinstance(student_logprob, Tensor) else student_logprob
        # The lazy student_logprob reads these tensors later: remember their versions to catch in-place updates.
        self._watched = [(t, t._version) for t in watched]

    @property
    def student_logprob(self) -> Tensor:
        """log softmax(z_student / tau)[target_ids], detached; computed on first access where needed."""
        if self._logprob is None:
            if any(t._version != v for t, v in self._watched):
                raise RuntimeError(
                    "student_logprob: the student's hidden states or weights were modified in place after "
                    "routed_loss (an optimizer step?); read student_logprob before changing them"
                )
            with autocast_off(self.route.device):  # the loss's own numerics, as in the call that made it
                self._logprob = self._logprob_fn()
            self._logprob_fn, self._watched = None, []
        return self._logprob

    def __repr__(self) -> str:
        return f"RoutedLossOutput(loss={self.loss!r}, shape={tuple(self.route.shape)})"

    def metrics(self, include_logprob: bool = False) -> dict[str, float]:
        """Route fractions, per-route mean loss, thresholds and signal means, as floats.

        All values are stacked into one tensor and copied to the host once: one synchronisation,
        cheap enough to log every step. Fractions are over valid tokens; a route with no token has
        loss 0. ``student_logprob_mean`` is included when it is already computed or when
        ``include_logprob`` asks for it.
        """
        route = self.route.reshape(-1)
        valid = route >= 0
        n_valid = valid.sum().to(torch.float64)
        denom = n_valid.clamp_min(1.0)
        ptl = self.per_token_loss.detach().reshape(-1).to(torch.float64)
        names: list[str] = ["loss", "n_tokens"]
        values: list[Tensor] = [self.loss.detach().to(torch.float64).reshape(()), n_valid]
        for rid, rname in enumerate(ROUTES):
            in_route = route == rid
            count = in_route.sum().to(torch.float64)
            names += [f"frac/{rname}", f"loss/{rname}"]
            values += [count / denom, torch.where(in_route, ptl, 0.0).sum() / count.clamp_min(1.0)]
        signals = ["adv_gap", "q_self", "q_teacher"]
        if include_logprob or self._logprob is not None:
            signals.append("student_logprob")
        for sig in signals:
            x = getattr(self, sig).detach().reshape(-1).to(torch.float64)
            names.append(f"{sig}_mean")
            values.append(torch.where(valid, x, 0.0).sum() / denom)
        for key, thr in self.thresholds.items():
            names.append(f"threshold/{key}")
            values.append(thr.detach().to(torch.float64).reshape(()))
        device = values[0].device
        host = torch.stack([v.to(device) for v in values]).cpu().tolist()
        return dict(zip(names, host))


@dataclass
class KeptRows:
    """The valid tokens of a call, flattened and compressed (what the fused paths compute on).

    rows (n,) their flat indices; the hidden states (n, H) detached; targets, hard_labels (n,);
    red_w (n,) the reduction weights in the compute dtype. ``output_from_kept_rows`` scatters back.
    """

    rows: Tensor
    student_hidden: Tensor
    self_hidden: Tensor
    teacher_hidden: Tensor
    targets: Tensor
    hard_labels: Optional[Tensor]
    red_w: Tensor


def keep_valid_rows(valid: Tensor, *, student_hidden: Tensor, self_hidden: Tensor, teacher_hidden: Tensor,
                    target_ids: Tensor, hard_labels: Optional[Tensor], config: RouteConfig,
                    dtype: torch.dtype) -> KeptRows:
    """The valid rows of every per-token input (no copy when every token is valid; one host sync on CUDA)."""
    flat_valid = valid.reshape(-1).to(torch.bool)
    rows = flat_valid.nonzero().squeeze(1)
    every_row = rows.numel() == flat_valid.numel()

    def compress(x: Tensor) -> Tensor:
        return x if every_row else x.index_select(0, rows)

    hs = student_hidden.shape[-1]
    return KeptRows(
        rows=rows,
        student_hidden=compress(student_hidden.reshape(-1, hs).detach()),
        self_hidden=compress(self_hidden.reshape(-1, hs).detach()),
        teacher_hidden=compress(teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()),
        targets=compress(target_ids.reshape(-1)),
        hard_labels=None if hard_labels is None else compress(hard_labels.reshape(-1)),
        red_w=compress(reduction_weights(valid.reshape(target_ids.shape), config.reduction, dtype).reshape(-1)),
    )


def output_from_kept_rows(
    *,
    shape: torch.Size,
    rows: Tensor,
    loss_value: Tensor,
    per_token: Tensor,
    routing,
    logprob: Tensor,
    fill_logprob: Callable[[Tensor], Tensor],
    grads,
    student_hidden: Tensor,
    student_weight: Tensor,
    student_bias: Optional[Tensor],
) -> RoutedLossOutput:
    """The output of a path that computed on the kept (valid) tokens only: their values scattered back to
    ``shape`` (0 / route -1 elsewhere) and the gradients attached (``attach.attach_grads``).

    rows (n,) the kept tokens' flat indices; per_token, logprob (n,) in the compute dtype, logprob NaN where
    the loss pass did not form the student's full softmax: ``fill_logprob(positions)`` computes those on
    first access (no grad); routing: ``routing.route_tokens``'s result on the kept tokens; grads: the path's
    ``GradBuffers`` (d hidden over the kept rows).
    """
    from .attach import attach_grads

    cdtype = per_token.dtype
    total = shape.numel()
    every_row = rows.numel() == total

    def scatter(values: Tensor) -> Tensor:
        out = torch.zeros(total, dtype=cdtype, device=values.device)
        return out.index_copy_(0, rows, values.to(cdtype)).reshape(shape)

    d_hidden = None
    if grads.hidden is not None:
        d_hidden = grads.hidden if every_row else grads.hidden.new_zeros(total, grads.hidden.shape[1]).index_copy_(
            0, rows, grads.hidden)
        d_hidden = d_hidden.reshape(student_hidden.shape)
    loss = attach_grads(
        loss_value.to(student_hidden.dtype if student_hidden.dtype == torch.float64 else torch.float32),
        d_hidden, grads.weight, grads.bias,  # converted by attach_grads (fp16: after the scaling by grad_output)
        student_hidden, student_weight, student_bias,
    )

    def lazy_logprob() -> Tensor:
        """The student's log-probs, those the loss pass did not compute filled in first."""
        with torch.no_grad():
            todo = torch.isnan(logprob).nonzero().squeeze(1)
            logprob.index_copy_(0, todo, fill_logprob(todo).to(cdtype))
            return scatter(logprob)

    route = routing.route
    return RoutedLossOutput(
        loss=loss,
        per_token_loss=scatter(per_token),
        route=torch.full((total,), -1, dtype=torch.int64, device=route.device).index_copy_(0, rows, route).reshape(
            shape),
        adv_gap=scatter(routing.adv_gap),
        q_self=scatter(routing.q_self),
        q_teacher=scatter(routing.q_teacher),
        student_logprob=lazy_logprob,
        thresholds=routing.thresholds,
        watched=[t for t in (student_hidden, student_weight, student_bias) if t is not None],
    )
