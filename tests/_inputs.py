"""Random inputs for the loss tests: related student / self / teacher models so every route is hit."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

Tensor = torch.Tensor


@dataclass
class LossInputs:
    """One problem: hidden states, projections, targets and mask (leading shape ``lead``)."""

    student_hidden: Tensor
    student_weight: Tensor
    teacher_hidden: Tensor
    teacher_weight: Tensor
    self_hidden: Tensor
    target_ids: Tensor
    mask: Optional[Tensor]
    student_bias: Optional[Tensor] = None
    teacher_bias: Optional[Tensor] = None
    hard_labels: Optional[Tensor] = None
    extra: dict = field(default_factory=dict)

    def args(self):
        return (self.student_hidden, self.student_weight, self.teacher_hidden, self.teacher_weight,
                self.self_hidden, self.target_ids, self.mask)

    def kwargs(self):
        return dict(student_bias=self.student_bias, teacher_bias=self.teacher_bias,
                    hard_labels=self.hard_labels, **self.extra)

    def fresh_leaves(self):
        """Copies of the student's trainable tensors as new leaves requiring grad (hidden, weight, bias)."""
        leaves = [t.detach().clone().requires_grad_() if t is not None else None
                  for t in (self.student_hidden, self.student_weight, self.student_bias)]
        return leaves


def make_inputs(
    lead=(3, 11), hs=12, ht=20, vocab=37, vt=None, *, dtype=torch.float64, bias=True, mask_frac=0.25,
    logit_scale=1.0, hard_labels=False, seed=0,
) -> LossInputs:
    """Student, privileged self and teacher that share structure, so their distributions are related
    (all four routes get tokens) but differ. ``vt`` > vocab adds teacher padding rows."""
    g = torch.Generator().manual_seed(seed)
    vt = vocab if vt is None else vt

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    base = randn(*lead, hs)
    w_s = randn(vocab, hs) * (logit_scale * 1.2 / hs**0.5)
    proj = randn(hs, ht) / hs**0.5
    w_t = (w_s @ proj) * 1.5 + randn(vocab, ht) * (logit_scale * 0.6 / ht**0.5)
    if vt > vocab:  # padding rows: large values that would dominate if they ever carried probability
        w_t = torch.cat([w_t, randn(vt - vocab, ht) * 5.0], 0)
    inp = LossInputs(
        student_hidden=base.to(dtype),
        student_weight=w_s.to(dtype),
        teacher_hidden=((base @ proj) + 0.7 * randn(*lead, ht)).to(dtype),
        teacher_weight=w_t.to(dtype),
        self_hidden=(base + 0.6 * randn(*lead, hs)).to(dtype),
        target_ids=torch.zeros(lead, dtype=torch.int64),
        mask=None,
    )
    # Sampled tokens: half drawn from the teacher, half from the student, so that on some tokens the
    # teacher is ahead (HT) and on others the privileged self is (HS).
    z_t = inp.teacher_hidden.double() @ w_t[:vocab].T
    z_s = base @ w_s.T
    pick_teacher = torch.rand(lead, generator=g) < 0.5
    probs = torch.where(pick_teacher[..., None], z_t, z_s).reshape(-1, vocab).softmax(-1)
    inp.target_ids = torch.multinomial(probs, 1, generator=g).reshape(lead)
    if mask_frac > 0:
        mask = torch.rand(*lead, generator=g) >= mask_frac
        inp.mask = mask
        inp.target_ids = torch.where(mask, inp.target_ids, -100)  # masked ids may be anything
    if bias:
        inp.student_bias = (0.3 * randn(vocab)).to(dtype)
        inp.teacher_bias = torch.cat([0.3 * randn(vocab), 10.0 + randn(vt - vocab)]).to(dtype)
    if hard_labels:
        inp.hard_labels = torch.randint(0, vocab, lead, generator=g)
    return inp


def rel_err(x: Tensor, ref: Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 (absolute error when ref is 0)."""
    x, ref = x.detach().to(torch.float64), ref.detach().to(torch.float64)
    denom = ref.norm().item()
    diff = (x - ref).norm().item()
    return diff / denom if denom > 0 else diff


def run_backend(inp: LossInputs, backend: str, config, upcast: bool = False):
    """Run routed_loss on fresh leaves; returns (output, grads of hidden, weight, bias)."""
    from dopd_kernels import routed_loss

    h, w, b = inp.fresh_leaves()
    args = list(inp.args())
    kw = inp.kwargs()
    if upcast:  # the float64 ground truth of lower-precision inputs
        h, w = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        b = None if b is None else b.detach().double().requires_grad_()
        args[2], args[3], args[4] = args[2].double(), args[3].double(), args[4].double()
        if kw["teacher_bias"] is not None:
            kw["teacher_bias"] = kw["teacher_bias"].double()
        for key in ("self_weight", "self_bias"):
            if kw.get(key) is not None:
                kw[key] = kw[key].double()
    args[0], args[1] = h, w
    kw["student_bias"] = b
    out = routed_loss(*args, config=config, backend=backend, **kw)
    out.loss.backward()
    return out, h.grad, w.grad, None if b is None else b.grad


FIELDS = ("per_token_loss", "adv_gap", "q_self", "q_teacher", "student_logprob")


def assert_outputs_close(out, ref, grads, ref_grads, tol: float, grad_tol: Optional[float] = None) -> None:
    """Loss, every per-token field, the routes and the gradients within ``tol`` relative."""
    grad_tol = tol if grad_tol is None else grad_tol
    assert torch.equal(out.route, ref.route), "routes differ"
    assert rel_err(out.loss, ref.loss) <= tol, (out.loss, ref.loss)
    for name in FIELDS:
        err = rel_err(getattr(out, name), getattr(ref, name))
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol}"
    for name, g, rg in zip(("d hidden", "d weight", "d bias"), grads, ref_grads):
        if rg is None:
            assert g is None, name
            continue
        assert g is not None, f"{name} missing"
        assert torch.isfinite(g).all(), name
        err = rel_err(g, rg)
        assert err <= grad_tol, f"{name}: relative error {err:.3g} > {grad_tol}"
