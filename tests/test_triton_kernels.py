"""Unit tests of the Triton kernels against torch (interpreter on CPU; compiled kernels on CUDA)."""

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from dopd_kernels.triton.blocks import blocks_for  # noqa: E402
from dopd_kernels.triton.matmul import matmul_into  # noqa: E402
from dopd_kernels.triton.stats import fused_linear_stats  # noqa: E402
from dopd_kernels.triton.topk import gather_logits, scatter_grad  # noqa: E402

# The interpreter evaluates masked-out lanes too (log(0), -inf - -inf there); those values are never used.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("impl", ["fused", "two_pass"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,vocab,hidden,k", [(19, 37, 24, 5), (5, 37, 17, 37), (7, 20, 33, 1), (3, 16, 16, 0),
                                              (70, 45, 18, 6)])
def test_stats_kernel_matches_torch(dtype, n, vocab, hidden, k, impl):
    """lse, target logit and top-K over the first `vocab` rows (padding rows with huge logits are ignored),
    fused or two-pass (N = 70 spans three 32-row chunks of the two-pass mode under the interpreter)."""
    h = torch.randn(n, hidden, device=DEVICE).to(dtype)
    w = torch.randn(vocab + 3, hidden, device=DEVICE).to(dtype)
    w[vocab:] = 50.0  # padding rows would dominate if they were read
    b = torch.randn(vocab + 3, device=DEVICE).to(dtype)
    y = torch.randint(0, vocab, (n,), device=DEVICE)
    st = fused_linear_stats(h, w, b, y, vocab=vocab, inv_tau=0.7, top_k=k, impl=impl)
    z = (h.double() @ w[:vocab].double().T + b[:vocab].double()) * 0.7
    tol = 1e-4 if dtype == torch.float32 or DEVICE == "cpu" else 2e-2
    torch.testing.assert_close(st.lse.double(), z.logsumexp(1), rtol=tol, atol=tol)
    torch.testing.assert_close(st.target_logit.double(), z.gather(1, y[:, None]).squeeze(1), rtol=tol, atol=tol)
    if k:
        vals, idx = z.topk(k, dim=1)
        assert torch.equal(st.topk_idx, idx)
        torch.testing.assert_close(st.topk_vals.double(), vals, rtol=tol, atol=tol)
    else:
        assert st.topk_idx is None


def test_stats_kernel_huge_logits_stay_finite():
    """Logits of magnitude 1e4 give a finite lse (online max subtraction)."""
    h = torch.full((4, 16), 100.0, device=DEVICE)
    w = torch.randn(21, 16, device=DEVICE) * 6.0
    st = fused_linear_stats(h, w, None, torch.zeros(4, dtype=torch.long, device=DEVICE), vocab=21, inv_tau=1.0, top_k=3)
    z = h.double() @ w.double().T
    assert z.abs().max() > 1e3
    assert torch.isfinite(st.lse).all()
    torch.testing.assert_close(st.lse.double(), z.logsumexp(1), rtol=1e-5, atol=1e-2)


def _expected_topk(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K in the kernel's documented order: larger value first, ties to the smaller id (-inf included)."""
    ids = torch.arange(z.shape[1]).expand_as(z)
    key = torch.where(torch.isinf(z) & (z < 0), -1e300, z.double().cpu())
    order = torch.from_numpy(np.lexsort((ids.numpy(), -key.numpy()), axis=1))[:, :k]
    return z.cpu().gather(1, order), order


_CASES = ["random", "ties", "constant", "neg_inf", "rising", "falling", "mixed"]


@pytest.mark.parametrize(
    "case,n_splits,vocab,k,impl",
    [(c, s, 53, 9, "fused") for c in _CASES for s in (1, 3)]
    + [(c, 1, 611, 20, "fused") for c in ("random", "ties", "rising", "falling", "mixed")]
    + [("constant", 2, 611, 3, "fused")]
    # the two-pass mode runs the same kernel on stored logits: a few cases cover its loads and row chunks
    + [("ties", 3, 53, 9, "two_pass"), ("mixed", 1, 611, 20, "two_pass"), ("neg_inf", 2, 53, 9, "two_pass")],
)
def test_stats_topk_streaming_order_and_edges(case, n_splits, vocab, k, impl):
    """The streaming top-K keeps exactly the K largest keys in every arrangement that stresses the candidate
    list: many ties (smaller id wins; the select's id half), constant rows, fewer finite logits than K,
    logits rising along the vocabulary (every key enters, compaction every few tiles) and falling (nothing
    enters after the first tiles), and a block mixing settled (falling) rows with random ones, so that cuts
    forced by some rows meet rows that hold exactly K keys. V = 611 runs several cuts per split."""
    n, hidden = 18, 16
    g = torch.Generator().manual_seed(3)
    h = torch.randint(-2, 3, (n, hidden), generator=g).float()
    w = torch.randint(-1, 2, (vocab, hidden), generator=g).float()
    b = torch.zeros(vocab)
    if case == "random":
        h, w = torch.randn(n, hidden, generator=g), torch.randn(vocab, hidden, generator=g)
    elif case == "constant":
        h[::2] = 0.0
    elif case == "neg_inf":
        b[torch.randperm(vocab, generator=g)[: vocab - 5]] = float("-inf")
    elif case in ("rising", "falling", "mixed"):
        h = torch.ones(n, hidden) * (1.0 + torch.arange(n) % 3)[:, None]  # exact products
        sign = 1.0 if case == "rising" else -1.0
        w = sign * torch.arange(vocab, dtype=torch.float32)[:, None].expand(vocab, hidden) / hidden
        if case == "mixed":  # odd rows: logits falling along the vocabulary; even rows: integer noise
            w = w.clone()
            w[:, 1:] = torch.randint(-8, 9, (vocab, hidden - 1), generator=g).float() / 16
            h[::2, 0] = 0.0
            h[1::2, 1:] = 0.0
    h, w, b = h.to(DEVICE), w.to(DEVICE), b.to(DEVICE)
    y = torch.randint(0, vocab, (n,), device=DEVICE)
    st = fused_linear_stats(h, w, b, y, vocab=vocab, inv_tau=1.0, top_k=k, n_splits=n_splits, impl=impl)
    z = (h.double() @ w.double().T + b.double()).float()
    vals, idx = _expected_topk(z, k)
    assert torch.equal(st.topk_idx.cpu(), idx)
    exact = case != "random"  # integer-valued logits: every summation order gives the same float
    torch.testing.assert_close(st.topk_vals.cpu(), vals, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-5)


def test_stats_topk_signed_zeros_tie():
    """-0.0 and +0.0 logits are one value: ties go to the smaller id whatever the sign of the zero
    (z * 1/tau underflows to a signed zero from tiny biases)."""
    n, vocab, k = 5, 83, 11
    h = torch.zeros(n, 16, device=DEVICE)
    w = torch.randn(vocab, 16, device=DEVICE)
    sign = torch.where(torch.arange(vocab) % 3 == 0, -1.0, 1.0)
    b = (sign * 1e-44).to(DEVICE)  # subnormal; times 1/tau = 0.01 it becomes -0.0 or +0.0
    b[vocab - 4:] = -5.0  # a few strictly smaller logits
    st = fused_linear_stats(h, w, b, torch.zeros(n, dtype=torch.long, device=DEVICE), vocab=vocab, inv_tau=0.01,
                            top_k=k, n_splits=1)
    assert torch.equal(st.topk_idx.cpu(), torch.arange(k).expand(n, k))
    assert (st.topk_vals == 0).all()


def test_stats_topk_nan_rows_stay_in_range():
    """Masked tokens may carry NaN hidden states: their top-K ids stay valid vocabulary ids, others exact."""
    h = torch.randn(6, 16, device=DEVICE)
    h[2] = float("nan")
    w = torch.randn(29, 16, device=DEVICE)
    st = fused_linear_stats(h, w, None, torch.zeros(6, dtype=torch.long, device=DEVICE), vocab=29, inv_tau=1.0,
                            top_k=4)
    assert ((st.topk_idx >= 0) & (st.topk_idx < 29)).all()
    keep = torch.arange(6, device=DEVICE) != 2
    assert torch.equal(st.topk_idx[keep], (h[keep] @ w.T).topk(4, dim=1).indices)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,vocab,hidden,k", [(9, 40, 33, 37), (5, 23, 16, 1), (12, 7, 20, 7)])
def test_topk_gather_and_scatter_match_torch(dtype, n, vocab, hidden, k):
    """Gathered logits and the folded gradients (d h, d W by atomics over ids shared across tokens, d b)
    against dense torch; rows that are off (NaN hidden states included) read nothing and add nothing."""
    blocks = blocks_for(torch.device(DEVICE))
    h = torch.randn(n, hidden, device=DEVICE).to(dtype)
    h[1] = float("nan")
    w = torch.randn(vocab, hidden, device=DEVICE).to(dtype)
    b = torch.randn(vocab, device=DEVICE).to(dtype)
    idx = torch.stack([torch.randperm(vocab, device=DEVICE)[:k] for _ in range(n)])
    on = torch.ones(n, dtype=torch.bool, device=DEVICE)
    on[1] = on[n - 1] = False
    z = gather_logits(h, w, b, idx, on, 0.5, blocks)
    hd, wd, bd = h.double(), w.double(), b.double()
    expect = torch.where(on[:, None], (torch.einsum("nkh,nh->nk", wd[idx], torch.nan_to_num(hd)) + bd[idx]) * 0.5, 0.0)
    tol = 1e-5 if dtype == torch.float32 or DEVICE == "cpu" else 1e-2
    torch.testing.assert_close(z.double(), expect, rtol=tol, atol=tol)
    dz = torch.where(on[:, None], torch.randn(n, k, device=DEVICE), 0.0)
    grads = {"hidden": torch.ones(n, hidden, device=DEVICE), "weight": torch.zeros(vocab, hidden, device=DEVICE),
             "bias": torch.zeros(vocab, device=DEVICE)}
    scatter_grad(dz, h, w, idx, on, grads, blocks)
    dense = torch.zeros(n, vocab, dtype=torch.float64, device=DEVICE).scatter_(1, idx, dz.double())
    hz = torch.where(on[:, None], hd, 0.0)
    torch.testing.assert_close(grads["hidden"].double(), 1.0 + dense @ wd, rtol=tol, atol=tol)
    torch.testing.assert_close(grads["weight"].double(), dense.T @ hz, rtol=tol, atol=tol)
    torch.testing.assert_close(grads["bias"].double(), dense.sum(0), rtol=tol, atol=tol)


@pytest.mark.parametrize("limit,live", [("m", 13), ("k", 9), ("m", 0)])
def test_matmul_limits_and_accumulate(limit, live):
    """C (+)= scale (A B + bias) with rows (or the reduction) cut at a device-side count."""
    blocks = blocks_for(torch.device(DEVICE))
    a = torch.randn(21, 35, device=DEVICE)
    b = torch.randn(27, 35, device=DEVICE)  # used transposed: (35, 27)
    bias = torch.randn(27, device=DEVICE)
    count = torch.tensor([live + 4], dtype=torch.int32, device=DEVICE)
    if limit == "m":
        out = torch.zeros(21, 27, device=DEVICE)
        matmul_into(out, a, b.T, blocks=blocks, count=count, row0=4, limit="m", bias=bias, scale=0.5)
        expect = torch.zeros_like(out)
        expect[:live] = 0.5 * (a[:live] @ b.T + bias)
    else:
        c = torch.randn(21, 27, device=DEVICE)
        out = torch.ones(35, 27, device=DEVICE)
        matmul_into(out, a.T, c, blocks=blocks, count=count, row0=4, limit="k", accumulate=True)
        expect = 1.0 + a[:live].T @ c[:live]
    torch.testing.assert_close(out, expect, rtol=1e-4, atol=1e-4)
