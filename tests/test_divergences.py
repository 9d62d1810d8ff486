"""KL direction, JS and top-K renormalization on hand-made distributions, and the closed-form gradients."""

import math

import pytest
import torch

from dopd_kernels import RouteConfig, routed_loss_from_logits
from dopd_kernels.divergences import divergence, divergence_and_grad

S = torch.tensor([0.8, 0.1, 0.1], dtype=torch.float64)  # student
T = torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64)  # teacher / source
LN2 = math.log(2.0)
# By hand: KL(S||T) = .8 ln2 + .1 ln(1/4) + .1 ln(1/2) = 0.5 ln2;  KL(T||S) = .4 ln(1/2) + .4 ln4 + .2 ln2 = 0.6 ln2
RKL, FKL = 0.5 * LN2, 0.6 * LN2
M = (S + T) / 2  # (0.6, 0.25, 0.15)
JS = 0.5 * sum(t * math.log(t / m) for t, m in zip(T.tolist(), M.tolist())) + 0.5 * sum(
    s * math.log(s / m) for s, m in zip(S.tolist(), M.tolist())
)


def test_hand_values():
    assert divergence(S.log(), T.log(), "rkl").item() == pytest.approx(RKL, rel=1e-14)
    assert divergence(S.log(), T.log(), "fkl").item() == pytest.approx(FKL, rel=1e-14)
    assert divergence(S.log(), T.log(), "jsd", 0.5).item() == pytest.approx(JS, rel=1e-14)
    # written out: KL(T||M) = .4 ln(.4/.6) + .4 ln(.4/.25) + .2 ln(.2/.15) = 0.083351,
    #              KL(S||M) = .8 ln(.8/.6) + .1 ln(.1/.25) + .1 ln(.1/.15) = 0.097970
    assert JS == pytest.approx(0.5 * (0.083351 + 0.097970), abs=1e-6)


def test_generalized_jsd_is_trl_convention():
    beta = 0.8
    m = beta * T + (1 - beta) * S
    expected = beta * (T * (T / m).log()).sum() + (1 - beta) * (S * (S / m).log()).sum()
    assert divergence(S.log(), T.log(), "jsd", beta).item() == pytest.approx(expected.item(), rel=1e-13)


@pytest.mark.parametrize("kind,expected", [("rkl", RKL), ("fkl", FKL), ("jsd", JS)])
def test_direction_through_routed_loss(kind, expected):
    """Every route made full-support `kind` toward the teacher: the per-token loss is the hand value."""
    zs = S.log().expand(2, 3).clone().requires_grad_()
    zt = T.log().expand(2, 3)
    cfg = RouteConfig(routes=[("teacher", kind, "full", 1.0)] * 4)
    out = routed_loss_from_logits(zs, zt, zs.detach(), torch.tensor([0, 1]), config=cfg)
    assert out.per_token_loss.tolist() == pytest.approx([expected, expected], rel=1e-6)


def test_topk_renormalizes_both_over_the_source_top_k():
    zt = torch.tensor([[0.5, 0.3, 0.1, 0.1]], dtype=torch.float64).log()
    zs = torch.tensor([[0.2, 0.2, 0.3, 0.3]], dtype=torch.float64).log()
    cfg = RouteConfig(routes=[("teacher", "rkl", "topk", 1.0)] * 4, top_k=2)
    out = routed_loss_from_logits(zs, zt, zs, torch.tensor([0]), config=cfg)
    # teacher top-2 = {0, 1}: t_K = (.625, .375); student renormalized there: (.5, .5)
    expected = 0.5 * math.log(0.5 / 0.625) + 0.5 * math.log(0.5 / 0.375)
    assert out.per_token_loss.item() == pytest.approx(expected, rel=1e-12)


def test_sampled_form_value():
    zs = S.log()[None]
    zt = T.log()[None]
    cfg = RouteConfig.preset("vanilla_opd_sampled")
    out = routed_loss_from_logits(zs.clone().requires_grad_(), zt, zs, torch.tensor([1]), config=cfg)
    l_s, l_t = math.log(0.1), math.log(0.4)
    assert out.per_token_loss.item() == pytest.approx((l_s - l_t) * l_s, rel=1e-12)


@pytest.mark.parametrize("kind", ["rkl", "fkl", "jsd"])
@pytest.mark.parametrize("beta", [0.5, 0.2])
def test_closed_form_gradient_matches_autograd(kind, beta):
    g = torch.Generator().manual_seed(1)
    z = (3 * torch.randn(5, 9, generator=g, dtype=torch.float64)).requires_grad_()
    lt = (3 * torch.randn(5, 9, generator=g, dtype=torch.float64)).log_softmax(-1)
    ls = z.log_softmax(-1)
    value, grad = divergence_and_grad(ls.detach(), lt, kind, beta)
    auto_value = divergence(ls, lt, kind, beta)
    (auto_grad,) = torch.autograd.grad(auto_value.sum(), z)
    assert torch.allclose(value, auto_value.detach(), rtol=1e-12, atol=0)
    assert torch.allclose(grad, auto_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kind", ["rkl", "fkl", "jsd"])
def test_extreme_logits_stay_finite(kind):
    z = torch.tensor([[1e4, -1e4, 0.0, 5e3]], dtype=torch.float64)
    zt = torch.tensor([[-1e4, 1e4, 3.0, 0.0]], dtype=torch.float64)
    value, grad = divergence_and_grad(z.log_softmax(-1), zt.log_softmax(-1), kind)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    # nearly disjoint supports: KL is huge but finite, JS saturates at ln 2
    assert value.item() == pytest.approx(LN2, rel=1e-6) if kind == "jsd" else value.item() > 1e3
