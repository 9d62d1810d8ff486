"""The compiled ops (csrc/) against plain float64 torch on random and adversarial rows, and opcheck on each.

Adversarial rows: exact ties (lower id first), all-equal rows, -inf entries, rows with fewer finite entries than
K, signed zeros, huge magnitudes, V below and not a multiple of the vector width, a view with a row stride > V.
"""

import pytest
import torch

from dopd_kernels import LogitTransform
from dopd_kernels.divergences import divergence

from _ext import devices, require_device, require_ext
from _inputs import rel_err


@pytest.fixture(scope="module")
def ext():
    return require_ext()


def _rows(case: str, c: int, v: int, g: torch.Generator) -> torch.Tensor:
    z = torch.randn(c, v, generator=g, dtype=torch.float64) * 3
    if case == "ties":
        z = torch.randint(-3, 3, (c, v), generator=g).double()
    elif case == "equal":
        z = torch.full((c, v), 1.5, dtype=torch.float64)
    elif case == "neg_inf":
        z[torch.rand(c, v, generator=g) < 0.6] = float("-inf")
    elif case == "few_finite":  # at most 2 finite entries per row: K > the finite count
        keep = torch.rand(c, v, generator=g).argsort(1)[:, :2]
        z = torch.full((c, v), float("-inf"), dtype=torch.float64).scatter(1, keep, z.gather(1, keep))
    elif case == "signed_zero":
        z = torch.randint(-1, 2, (c, v), generator=g).double() * torch.where(torch.rand(c, v, generator=g) < 0.5, -0.0, 1.0)
    elif case == "all_neg_inf":  # whole rows of -inf (a vocabulary shard masked whole): lse -inf, ids in order
        z[::3] = float("-inf")
    elif case == "huge":
        z = z * 3e3
    elif case == "sorted":
        z = torch.arange(v, dtype=torch.float64).repeat(c, 1) * 0.01
    return z.float()


def _ref_row_stats(z: torch.Tensor, y: torch.Tensor, k: int, scale: float):
    """float64: logsumexp, target, and a stable descending sort (ties and -inf entries in id order)."""
    x = z.double() * scale
    vals, idx = torch.sort(x, dim=1, descending=True, stable=True)
    return torch.logsumexp(x, 1), x.gather(1, y[:, None]).squeeze(1), vals[:, :k], idx[:, :k]


CASES = ["random", "ties", "equal", "neg_inf", "few_finite", "all_neg_inf", "signed_zero", "huge", "sorted"]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("v,k", [(1, 1), (5, 3), (37, 7), (37, 37), (1000, 128), (4099, 3), (4099, 0)])
def test_row_stats_matches_torch(ext, device, case, v, k):
    require_device(device)
    g = torch.Generator().manual_seed(v * 31 + k)
    z = _rows(case, 6, v, g)
    y = torch.randint(0, v, (6,), generator=g)
    scale = 0.7 if case != "huge" else 1.0
    lse, tgt, vals, idx = (t.cpu() for t in ext.row_stats(z.to(device), y.to(device), k, scale))
    r_lse, r_tgt, r_vals, r_idx = _ref_row_stats(z, y, k, scale)
    torch.testing.assert_close(lse.double(), r_lse, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(tgt.double(), r_tgt, rtol=1e-6, atol=0)
    assert torch.equal(idx, r_idx), f"top-K ids differ: {idx[:2]} vs {r_idx[:2]}"
    torch.testing.assert_close(vals.double(), r_vals, rtol=1e-6, atol=0)
    assert idx.dtype == torch.int64 and vals.shape == (6, k)


@pytest.mark.parametrize("device", devices())
def test_row_stats_reads_a_view_and_flags_bad_targets(ext, device):
    require_device(device)
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(9, 70, generator=g).to(device)
    z = wide[:, :53]  # row stride 70 > V = 53
    y = torch.tensor([0, 52, 53, -1, 7, 8, 9, 10, 11], device=device)
    lse, tgt, vals, idx = ext.row_stats(z, y, 5)
    torch.testing.assert_close(lse, z.logsumexp(1))
    assert torch.isnan(tgt[2]) and torch.isnan(tgt[3]), "ids outside [0, V) must give NaN, never another logit"
    assert tgt[1] == z[1, 52]
    assert torch.equal(idx, torch.sort(z, dim=1, descending=True, stable=True).indices[:, :5])


def _ref_divergence(zs, zt, y, kind, beta, scale, grad_scale):
    """Independent derivation: autograd of the divergences.py definition in float64."""
    xs = zs.double().requires_grad_()
    ls = (xs * scale).log_softmax(-1)
    lt = (zt.double() * scale).log_softmax(-1)
    value = divergence(ls, lt, kind, beta)
    (value * grad_scale.double()).sum().backward()
    return value.detach(), xs.grad, ls.detach().gather(1, y[:, None]).squeeze(1)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind,beta", [("rkl", 0.5), ("fkl", 0.5), ("jsd", 0.5), ("jsd", 0.9)])
@pytest.mark.parametrize("case,v", [("random", 37), ("random", 1000), ("masked", 301), ("peaked", 40), ("tiny", 3)])
def test_full_divergence_matches_autograd(ext, device, kind, beta, case, v):
    require_device(device)
    g = torch.Generator().manual_seed(v)
    zs = torch.randn(5, v, generator=g) * 2
    zt = zs + torch.randn(5, v, generator=g)
    if case == "masked":  # masked vocabulary entries: -inf in both
        dead = torch.rand(5, v, generator=g) < 0.3
        zs[dead] = zt[dead] = float("-inf")
    elif case == "peaked":  # probabilities that underflow fp32 next to ones near 1
        zs[:, 0] += 60.0
        zt[:, 1] += 60.0
    y = torch.randint(0, v, (5,), generator=g)
    grad_scale = torch.rand(5, generator=g) + 0.5
    scale = 1.3
    r_value, r_grad, r_lp = _ref_divergence(zs, zt, y, kind, beta, scale, grad_scale)
    s, t = zs.clone().to(device), zt.clone().to(device)
    value, logprob = ext.full_divergence_(s, t, y.to(device), kind, beta, scale, grad_scale.to(device))
    torch.testing.assert_close(value.cpu().double(), r_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logprob.cpu().double(), r_lp, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(s).all(), "the gradient must be finite (0 at -inf logits)"
    torch.testing.assert_close(s.cpu().double(), r_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["rkl", "fkl", "jsd"])
@pytest.mark.parametrize("masked", [False, True])
def test_full_divergence_gradient_through_a_softcap(ext, device, kind, masked):
    """student holds soft-capped logits t = cap tanh(u / cap); the gradient is d/du (the transform's chain)."""
    g = torch.Generator().manual_seed(7)
    require_device(device)
    cap, scale = 4.0, 1.3
    u = torch.randn(4, 301, generator=g, dtype=torch.float64) * 5
    zt = (u + torch.randn(4, 301, generator=g, dtype=torch.float64)).float()
    if masked:
        u[:, ::7] = float("-inf")
        zt[:, ::7] = float("-inf")
    y = torch.randint(0, 301, (4,), generator=g)
    grad_scale = torch.rand(4, generator=g) + 0.5
    ud = u.clone().requires_grad_()
    t = LogitTransform(softcap=cap).apply(ud)
    value = divergence((t * scale).log_softmax(-1), (zt.double() * scale).log_softmax(-1), kind, 0.5)
    (value * grad_scale.double()).sum().backward()
    s = t.detach().float().to(device)
    out, _ = ext.full_divergence_(s, zt.clone().to(device), y.to(device), kind, 0.5, scale, grad_scale.to(device), cap)
    torch.testing.assert_close(out.cpu().double(), value.detach(), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(s).all()
    assert rel_err(s.cpu(), ud.grad) < 1e-5


def _ref_topk(h, w, b, idx, src, kind, beta, scale, grad_scale, transform=LogitTransform()):
    hd, wd = h.double().requires_grad_(), w.double().requires_grad_()
    bd = None if b is None else b.double().requires_grad_()
    z = transform.apply(torch.einsum("rh,rkh->rk", hd, wd[idx]) + (0 if bd is None else bd[idx]))
    ls = (z * scale).log_softmax(-1)
    value = divergence(ls, src.double().log_softmax(-1), kind, beta)
    (value * grad_scale.double()).sum().backward()
    return value.detach(), hd.grad, wd.grad, None if bd is None else bd.grad


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind,beta", [("rkl", 0.5), ("fkl", 0.5), ("jsd", 0.3)])
@pytest.mark.parametrize("rows,hidden,vocab,k,bias", [(7, 37, 53, 5, True), (40, 16, 20, 20, False), (3, 70, 400, 128, True)])
@pytest.mark.parametrize("transform", [LogitTransform(), LogitTransform(scale=1.7, softcap=2.5), LogitTransform(scale=0.6)],
                         ids=["identity", "softcap", "scale"])
def test_topk_divergence_matches_autograd(ext, device, kind, beta, rows, hidden, vocab, k, bias, transform):
    require_device(device)
    g = torch.Generator().manual_seed(rows + hidden)
    h = torch.randn(rows, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) / hidden**0.5
    b = torch.randn(vocab, generator=g) if bias else None
    idx = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(rows)])  # ids shared across rows
    src = torch.randn(rows, k, generator=g) * 2
    grad_scale = torch.rand(rows, generator=g) + 0.5
    scale = 0.8
    r_value, r_dh, r_dw, r_db = _ref_topk(h, w, b, idx, src, kind, beta, scale, grad_scale, transform)
    # the op reads rows `picked` of a larger hidden and adds into what the gradient buffers hold
    n_hidden = rows + 4
    picked = torch.randperm(n_hidden, generator=g)[:rows]
    big = torch.randn(n_hidden, hidden, generator=g)
    big[picked] = h
    # small starting values, so that subtracting them back loses nothing at fp32
    dh0, dw0, db0 = (1e-3 * torch.randn(n_hidden, hidden, generator=g), 1e-3 * torch.randn(vocab, hidden, generator=g),
                     1e-3 * torch.randn(vocab, generator=g))
    dh, dw = dh0.clone().to(device), dw0.clone().to(device)
    db = db0.clone().to(device) if bias else None
    # idx and source logits have a row per hidden row too; the rows not picked hold ids the op must not read
    big_idx = torch.full((n_hidden, k), vocab + 5, dtype=torch.int64)
    big_src = torch.full((n_hidden, k), float("nan"))
    big_idx[picked], big_src[picked] = idx, src
    value = ext.topk_divergence(big.to(device), picked.to(device), w.to(device), None if b is None else b.to(device),
                                big_idx.to(device), big_src.to(device), kind, beta, scale, grad_scale.to(device), dh, dw,
                                db, transform.scale, transform.softcap or 0.0)
    torch.testing.assert_close(value.cpu().double(), r_value, rtol=1e-5, atol=1e-6)
    # fp32 sums over K ids with cancellations: compare the gradients as wholes (norm-relative)
    assert rel_err((dh.cpu() - dh0)[picked], r_dh) < 1e-5
    others = torch.ones(n_hidden, dtype=torch.bool)
    others[picked] = False
    assert torch.equal(dh.cpu()[others], dh0[others]), "rows not picked must stay untouched"
    assert rel_err(dw.cpu() - dw0, r_dw) < 1e-5
    if bias:
        assert rel_err(db.cpu() - db0, r_db) < 1e-5


def test_bad_arguments_are_clear_errors(ext):
    z, y = torch.randn(3, 10), torch.zeros(3, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="float32"):
        ext.row_stats(z.double(), y, 2)
    with pytest.raises(RuntimeError, match="k must be in"):
        ext.row_stats(z, y, 11)
    with pytest.raises(RuntimeError, match="kind must be"):
        ext.full_divergence_(z.clone(), z.clone(), y, "kl", 0.5, 1.0, torch.ones(3))
    with pytest.raises(RuntimeError, match="beta"):
        ext.full_divergence_(z.clone(), z.clone(), y, "jsd", 1.0, 1.0, torch.ones(3))
    rows = torch.arange(3)
    with pytest.raises(RuntimeError, match="idx holds 10"):
        ext.topk_divergence(torch.randn(3, 4), rows, torch.randn(10, 4), None, torch.full((3, 2), 10),
                            torch.randn(3, 2), "rkl", 0.5, 1.0, torch.ones(3), None, None, None)
    with pytest.raises(RuntimeError, match="distinct"):
        ext.topk_divergence(torch.randn(3, 4), torch.tensor([0, 2, 0]), torch.randn(10, 4), None,
                            torch.zeros(3, 2, dtype=torch.int64), torch.randn(3, 2), "rkl", 0.5, 1.0, torch.ones(3),
                            torch.zeros(3, 4), None, None)


@pytest.mark.parametrize("device", devices())
def test_opcheck_every_op(ext, device):
    require_device(device)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 37, generator=g).to(device)
    y = torch.randint(0, 37, (4,), generator=g).to(device)
    ones = torch.ones(4, device=device)
    ones3 = torch.ones(3, device=device)
    h, w = torch.randn(4, 8, generator=g).to(device), torch.randn(37, 8, generator=g).to(device)
    idx = torch.stack([torch.randperm(37, generator=g)[:5] for _ in range(4)]).to(device)
    rows = torch.tensor([3, 0, 2], device=device)
    cases = [
        (torch.ops.dopd.row_stats.default, (z, y, 5, 0.5)),
        (torch.ops.dopd.row_stats.default, (z, y, 0, 1.0)),
        (torch.ops.dopd.full_divergence_.default, (z.clone(), z.flip(1).contiguous(), y, "jsd", 0.5, 1.0, ones)),
        (torch.ops.dopd.full_divergence_.default, (z.tanh(), z.flip(1).contiguous(), y, "rkl", 0.5, 1.0, ones, 1.0)),
        (torch.ops.dopd.topk_divergence.default, (h, rows, w, torch.randn(37, device=device), idx,
                                                  torch.randn(4, 5, device=device), "rkl", 0.5, 1.0, ones3,
                                                  torch.zeros_like(h), torch.zeros_like(w), torch.zeros(37, device=device))),
        (torch.ops.dopd.topk_divergence.default, (h, rows, w, None, idx, torch.randn(4, 5, device=device), "fkl", 0.5,
                                                  2.0, ones3, None, None, None, 0.5, 3.0)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
