"""Triton path numerics that the earlier tests did not reach: fp16 gradients and -inf biases.

- fp16: the per-logit gradients carry the reduction weight (~1/N tokens) and sit far below fp16's normal
  range; the backward GEMMs scale them by a per-chunk power of two before the fp16 conversion, and the
  gradients stay fp32 until after the scaling by grad_output (AMP loss scaling). Checked against float64
  at a realistic 1/16384 weight, with the unscaled operand path as a control that must fail the tolerance.
- -inf biases (a masked vocabulary): vocabulary tiles and whole statistics splits holding only -inf logits.
Interpreter on CPU (fp16 tl.dot operands are real fp16 there: numpy multiplies them exactly into fp32).
"""

import pytest
import torch

pytest.importorskip("triton")

from dopd_kernels import RouteConfig, routed_loss  # noqa: E402
from dopd_kernels.divergences import divergence_and_grad  # noqa: E402
from dopd_kernels.triton.blocks import blocks_for  # noqa: E402
from dopd_kernels.triton.full_support import KIND_RKL, Model, student_full_rows  # noqa: E402
from dopd_kernels.triton.matmul import matmul_into  # noqa: E402
from dopd_kernels.triton.stats import fused_linear_stats  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel(x, ref):
    """||x - ref|| / ||ref|| in float64."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    return ((x - ref).norm() / ref.norm()).item()


def _fp16_problem(n=21, hs=24, ht=20, vocab=45, red=2.0**-20, seed=0):
    g = torch.Generator().manual_seed(seed)
    half = dict(dtype=torch.float16, device=DEVICE)
    h_s = torch.randn(n, hs, generator=g).to(**half)
    w_s = (torch.randn(vocab, hs, generator=g) * 2 / hs**0.5).to(**half)
    h_t = torch.randn(n, ht, generator=g).to(**half)
    w_t = (torch.randn(vocab, ht, generator=g) * 3 / ht**0.5).to(**half)
    return h_s, w_s, h_t, w_t, torch.full((n,), red, device=DEVICE)


def _rkl_grads_float64(h_s, w_s, h_t, w_t, red):
    """d hidden, d weight of sum_n red_n KL(S_n || T_n), closed form in float64 from the fp16 values."""
    ls = (h_s.double() @ w_s.double().T).log_softmax(-1)
    lt = (h_t.double() @ w_t.double().T).log_softmax(-1)
    _, dz = divergence_and_grad(ls, lt, "rkl")
    dz = dz * red.double()[:, None]
    return dz @ w_s.double(), dz.T @ h_s.double(), dz


def test_fp16_backward_gemms_keep_small_gradients():
    """student_full_rows with fp16 models and a 2^-20 reduction weight: the logit gradients (~1e-8 .. 1e-6)
    sit in fp16's subnormal range or below, as they do at 1/16384 tokens over a 151936-word vocabulary (where
    most probabilities are ~1/V). d hidden and d weight within 1e-3 of float64. Chunks of 8 rows (three
    chunks, the last ragged), each with its own power-of-two scale."""
    h_s, w_s, h_t, w_t, red = _fp16_problem()
    n, vocab = h_s.shape[0], w_s.shape[0]
    ref_dh, ref_dw, ref_dz = _rkl_grads_float64(h_s, w_s, h_t, w_t, red)
    assert ref_dz.abs().max() < 6.1e-5  # below fp16's smallest normal number
    f32 = dict(dtype=torch.float32, device=DEVICE)
    grads = {"hidden": torch.zeros(n, h_s.shape[1], **f32), "weight": torch.zeros(vocab, h_s.shape[1], **f32),
             "bias": None}
    zeros = torch.zeros(n, **f32)
    ids = torch.zeros(n, dtype=torch.int64, device=DEVICE)
    per_row = dict(y=ids, yh=ids, kind=torch.full((n,), KIND_RKL, dtype=torch.int32, device=DEVICE),
                   rw=torch.ones(n, **f32), use_t=torch.ones(n, dtype=torch.int32, device=DEVICE),
                   lse_t=(h_t.double() @ w_t.double().T).logsumexp(-1).float(), lse_p=zeros, lsrc=zeros, red=red)
    student_full_rows(order=torch.arange(n, device=DEVICE), count=torch.tensor([n], dtype=torch.int32, device=DEVICE),
                      student=Model(h_s, w_s, None), teacher=Model(h_t, w_t, None), self_model=None, per_row=per_row,
                      vocab=vocab, inv_tau=1.0, jsd_beta=0.5, ce_weight=0.0,
                      flags={"rkl": True, "fkl": False, "jsd": False, "sampled": False}, chunk=8,
                      blocks=blocks_for(torch.device(DEVICE)), per_token=torch.zeros(n, **f32),
                      student_logprob=torch.zeros(n, **f32), grads=grads)
    assert rel(grads["hidden"], ref_dh) < 1e-3
    assert rel(grads["weight"], ref_dw) < 1e-3


@pytest.mark.skipif(DEVICE != "cpu", reason="control for the interpreter's fp16 operand emulation")
def test_fp16_operands_without_the_scale_would_fail_the_tolerance():
    """The control: the same float64 logit gradients fed to the fp16 GEMM without the power-of-two scale
    (the old path) lose several percent, so the tolerance above catches a missing scale."""
    h_s, w_s, h_t, w_t, red = _fp16_problem()
    ref_dh, _, ref_dz = _rkl_grads_float64(h_s, w_s, h_t, w_t, red)
    count = torch.tensor([h_s.shape[0]], dtype=torch.int32)
    blocks = blocks_for(torch.device("cpu"))
    outs = {}
    for scaled in (False, True):
        out = torch.zeros_like(ref_dh, dtype=torch.float32)
        dz = ref_dz.float()
        amax = dz.abs().max().reshape(1) if scaled else None
        matmul_into(out, dz, w_s, blocks=blocks, count=count, row0=0, limit="m", operand_dtype=torch.float16,
                    a_amax=amax)
        outs[scaled] = rel(out, ref_dh)
    assert outs[False] > 1e-2 and outs[True] < 1e-3, outs


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fp16_gradients_convert_after_the_loss_scale(backend):
    """AMP: fp16 inputs whose d W (~1e-7 .. 1e-5) is only representable in fp16 after the loss scale (2^16): a
    temperature of 16000 (over logits of ~16000) puts 1/tau into every logit gradient. Converting to fp16
    before the scaling (the old attach) gives ~1.7e-2 relative error here; now it is ~3e-4."""
    g = torch.Generator().manual_seed(4)
    shape, hs, ht, vocab = (2, 9), 24, 20, 37
    h = torch.randn(*shape, hs, generator=g)
    t = dict(student_hidden=h, student_weight=torch.randn(vocab, hs, generator=g) * 3200,
             teacher_hidden=torch.randn(*shape, ht, generator=g),
             teacher_weight=torch.randn(vocab, ht, generator=g) * 3600,
             self_hidden=h + 0.3 * torch.randn(*shape, hs, generator=g))
    target = torch.randint(0, vocab, shape, generator=g)
    config = RouteConfig.preset("vanilla_opd", temperature=16000.0)
    grads = {}
    for name, dtype in (("half", torch.float16), ("ref", torch.float64)):
        x = {k: v.to(torch.float16).to(dtype).to(DEVICE) for k, v in t.items()}  # the same fp16 values
        hs_, ws_ = x.pop("student_hidden").requires_grad_(), x.pop("student_weight").requires_grad_()
        out = routed_loss(hs_, ws_, x["teacher_hidden"], x["teacher_weight"], x["self_hidden"], target.to(DEVICE),
                          config=config, backend=backend if name == "half" else "reference")
        (out.loss * 2.0**16).backward()
        grads[name] = (hs_.grad, ws_.grad)
    ref_dw = grads["ref"][1]
    assert ref_dw.abs().max() * 2.0**-16 < 6.1e-5  # before the loss scale: below fp16's normal range
    assert grads["half"][1].dtype == torch.float16
    assert rel(grads["half"][1], ref_dw) < 3e-3
    assert rel(grads["half"][0], grads["ref"][0]) < 3e-3


@pytest.mark.parametrize("impl", ["fused", "two_pass"])
@pytest.mark.parametrize("k", [0, 5])
def test_stats_whole_splits_of_minus_inf_bias(impl, k):
    """A -inf bias over whole vocabulary splits (7 splits of one 16-column tile; splits 0-2 and 5 hold only
    -inf logits) and over a partial tile: lse, target logit and top-K finite and exact."""
    g = torch.Generator().manual_seed(5)
    n, hidden, vocab = 19, 16, 100
    h = torch.randn(n, hidden, generator=g).to(DEVICE)
    w = torch.randn(vocab, hidden, generator=g).to(DEVICE)
    b = torch.zeros(vocab)
    b[:48] = float("-inf")
    b[80:96] = float("-inf")
    b[50:53] = float("-inf")
    b = b.to(DEVICE)
    finite = torch.nonzero(torch.isfinite(b.cpu())).squeeze(1)
    y = finite[torch.randint(0, finite.numel(), (n,), generator=g)].to(DEVICE)
    st = fused_linear_stats(h, w, b, y, vocab=vocab, inv_tau=1.0, top_k=k, n_splits=7, impl=impl)
    z = h.double() @ w.double().T + b.double()
    assert torch.isfinite(st.lse).all()
    torch.testing.assert_close(st.lse.double(), z.logsumexp(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.target_logit.double(), z.gather(1, y[:, None]).squeeze(1), rtol=1e-5, atol=1e-5)
    if k:
        vals, idx = z.topk(k, dim=1)
        assert torch.equal(st.topk_idx, idx)
        torch.testing.assert_close(st.topk_vals.double(), vals, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["gkd", "vanilla_opd", "vanilla_opd_sampled"])
def test_loss_with_a_masked_vocabulary(preset):
    """Student and teacher biases of -inf over the first 20 ids (the first vocabulary tiles of the rows
    kernel hold only -inf logits) and a few more: loss and gradients finite and equal to the reference."""
    g = torch.Generator().manual_seed(6)
    shape, hs, ht, vocab = (2, 9), 24, 20, 37
    bias = torch.zeros(vocab)
    bias[:20] = float("-inf")
    bias[30:33] = float("-inf")
    h = torch.randn(*shape, hs, generator=g)
    t = dict(student_hidden=h, student_weight=torch.randn(vocab, hs, generator=g) * 0.6,
             teacher_hidden=torch.randn(*shape, ht, generator=g),
             teacher_weight=torch.randn(vocab, ht, generator=g) * 0.8,
             self_hidden=h + 0.3 * torch.randn(*shape, hs, generator=g))
    finite = torch.nonzero(torch.isfinite(bias)).squeeze(1)
    target = finite[torch.randint(0, finite.numel(), shape, generator=g)]
    results = {}
    for backend in ("reference", "triton"):
        x = {k: v.to(DEVICE) for k, v in t.items()}
        hs_, ws_ = x.pop("student_hidden").requires_grad_(), x.pop("student_weight").requires_grad_()
        out = routed_loss(hs_, ws_, x["teacher_hidden"], x["teacher_weight"], x["self_hidden"], target.to(DEVICE),
                          student_bias=bias.to(DEVICE), teacher_bias=bias.to(DEVICE), config=preset, backend=backend)
        out.loss.backward()
        results[backend] = (out, hs_.grad, ws_.grad)
    (ref, ref_dh, ref_dw), (tri, dh, dw) = results["reference"], results["triton"]
    assert torch.isfinite(tri.loss) and torch.isfinite(dh).all() and torch.isfinite(dw).all()
    assert torch.equal(tri.route.cpu(), ref.route.cpu())
    assert rel(tri.per_token_loss, ref.per_token_loss) < 1e-4
    assert rel(tri.student_logprob, ref.student_logprob) < 1e-4
    assert rel(dh, ref_dh) < 1e-4 and rel(dw, ref_dw) < 1e-4
