"""Unit tests of the Triton kernels against torch (interpreter on CPU; compiled kernels on CUDA)."""

import pytest
import torch

pytest.importorskip("triton")

from dopd_kernels.triton.blocks import blocks_for  # noqa: E402
from dopd_kernels.triton.matmul import matmul_into  # noqa: E402
from dopd_kernels.triton.stats import fused_linear_stats  # noqa: E402

# The interpreter evaluates masked-out lanes too (log(0), -inf - -inf there); those values are never used.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,vocab,hidden,k", [(19, 37, 24, 5), (5, 37, 17, 37), (7, 20, 33, 1), (3, 16, 16, 0)])
def test_stats_kernel_matches_torch(dtype, n, vocab, hidden, k):
    """lse, target logit and top-K over the first `vocab` rows (padding rows with huge logits are ignored)."""
    h = torch.randn(n, hidden, device=DEVICE).to(dtype)
    w = torch.randn(vocab + 3, hidden, device=DEVICE).to(dtype)
    w[vocab:] = 50.0  # padding rows would dominate if they were read
    b = torch.randn(vocab + 3, device=DEVICE).to(dtype)
    y = torch.randint(0, vocab, (n,), device=DEVICE)
    st = fused_linear_stats(h, w, b, y, vocab=vocab, inv_tau=0.7, top_k=k)
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
