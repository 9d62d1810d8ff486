"""LogitTransform (multiplier, final soft-cap) on the Triton path against the float64 reference.

Under Triton's interpreter on the CPU (tests/conftest.py), at ragged shapes: V = 37 (not a multiple of the
16-wide vocabulary tiles, 2 statistics splits), Hs = 12, Ht = 20 (not powers of two), masked tokens holding
-100, teacher padding rows. Loss, every output field and all gradients, for every preset with CE and a
temperature, a custom table where every model has its own transform (self_weight, self_bias), bf16 and
fp16, -inf biases under a soft-cap (a whole vocabulary tile and a whole statistics split), saturated caps
with ties across the top-K cut, the two-pass statistics mode; the epilogue's tanh against float64, the
float64 fallback and the self-check of backend="auto".
"""

import dataclasses

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from dopd_kernels import PRESETS, LogitTransform, RouteConfig, RouteSpec, api, routed_loss, selfcheck  # noqa: E402
from dopd_kernels.topk import topk_lower_id  # noqa: E402
from dopd_kernels.triton.softcap import kernel_transform, softcap_slope, transform_logits  # noqa: E402
from dopd_kernels.triton.stats import fused_linear_stats  # noqa: E402

from _inputs import assert_outputs_close, make_inputs, rel_err, run_backend  # noqa: E402

# The interpreter evaluates masked-out lanes too (log(0), -inf - -inf, exp overflow there); never used values.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: Gemma-2-like student (a multiplier, then a cap its logits reach), Cohere/Granite-like teacher (multiplier).
STUDENT_TF = LogitTransform(scale=1.7, softcap=5.0)
TEACHER_TF = LogitTransform(scale=0.6)
#: fp32 kernels against float64: ~1e-7 observed; bf16 / fp16 gradients are rounded to the input dtype.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _to(inp, dtype):
    """The float64 problem in ``dtype`` on DEVICE (the reference then upcasts these same values)."""
    for f in dataclasses.fields(inp):
        v = getattr(inp, f.name)
        if isinstance(v, torch.Tensor):
            setattr(inp, f.name, (v.to(dtype) if v.is_floating_point() else v).to(DEVICE))
    inp.extra = {k: v.to(dtype).to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in inp.extra.items()}
    return inp


def _compare(inp, config, dtype=torch.float32):
    ref = run_backend(inp, "reference", config, upcast=True)
    out = run_backend(inp, "triton", config)
    assert_outputs_close(out[0], ref[0], out[1:], ref[1:], TOL[dtype], GRAD_TOL[dtype])
    return out[0], ref[0]


def _assert_transform_matters(inp, config, out):
    """Without the transforms the loss differs: a path that ignored them would fail the comparison."""
    plain = inp.kwargs() | {"student_transform": None, "teacher_transform": None, "self_transform": None}
    base = routed_loss(*inp.args(), **plain, config=config, backend="triton")
    assert rel_err(base.loss, out.loss) > 1e-3


# --- the epilogue ----------------------------------------------------------------------------------------------

@triton.jit
def _epilogue_kernel(z_ptr, out_ptr, slope_ptr, n, pre, post, inv_post, SOFTCAP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    out = transform_logits(tl.load(z_ptr + offs, mask=ok, other=0.0), pre, post, SOFTCAP)
    tl.store(out_ptr + offs, out, mask=ok)
    tl.store(slope_ptr + offs, softcap_slope(out, inv_post), mask=ok)


def _epilogue(z, tf, inv_tau):
    k = kernel_transform(tf, inv_tau)
    out, slope = torch.empty_like(z), torch.empty_like(z)
    _epilogue_kernel[(triton.cdiv(z.numel(), 256),)](z, out, slope, z.numel(), k.pre, k.post, k.inv_post,
                                                       SOFTCAP=k.softcap, BLOCK=256)
    return out, slope


def test_epilogue_tanh_against_float64():
    """post * tanh(pre * z) within 4 fp32 ulps of float64 over the whole range (both branches of tanh_f32, its
    boundary, tiny and huge logits, +-inf; 2.2 ulps measured under the interpreter, whose exp is numpy's; on a
    GPU, ex2.approx and div.full may add ~4 more); -inf stays -inf, +inf saturates, nothing is NaN; the slope
    1 - tanh^2 within 1e-6 absolute and exactly 0 at -inf; without a cap, exactly z * post."""
    tf, inv_tau = LogitTransform(scale=1.3, softcap=2.0), 0.8
    pre = 1.3 / 2.0
    edges = torch.tensor([0.25 / pre * (1 + d) for d in (-1e-6, 0.0, 1e-6)]
                         + [0.0, -0.0, 1e-30, -1e-30, 1e-3, 1e30, -1e30, 3e38, float("inf"), float("-inf")])
    z = torch.cat([torch.linspace(-60.0, 60.0, 4001), -torch.logspace(-8, 1, 200), torch.logspace(-8, 1, 200),
                   edges]).float().to(DEVICE)
    out, slope = _epilogue(z, tf, inv_tau)
    assert not torch.isnan(out).any() and not torch.isnan(slope).any()
    assert torch.equal(torch.isneginf(out), torch.isneginf(z))
    z64 = z.double()
    want = 2.0 * inv_tau * torch.tanh(pre * z64)
    fin = torch.isfinite(z)
    err = (out.double() - want).abs() / want.abs().clamp_min(1e-37)
    assert err[fin].max() < (4 if DEVICE == "cpu" else 8) * 2.0**-23, err[fin].max()
    assert out[z == float("inf")].item() == pytest.approx(2.0 * inv_tau, rel=1e-7)
    want_slope = 1.0 - torch.tanh(pre * z64) ** 2
    assert (slope.double() - want_slope)[~torch.isneginf(z)].abs().max() < 1e-6
    assert (slope[torch.isneginf(z)] == 0).all()
    plain, _ = _epilogue(z, LogitTransform(scale=1.3), inv_tau)
    assert torch.equal(plain, z * torch.tensor(1.3 * inv_tau, dtype=torch.float32))


def test_stats_kernel_softcap_ties_and_minus_inf_splits():
    """The statistics kernel alone (fused and two-pass): lse, target logit and the top-K of soft-capped logits
    with 9 saturated entries (exact ties at the cap) across a K = 5 cut, which go to the lower ids as
    topk_lower_id's; whole -inf splits (7 splits of one 16-wide tile; splits 0-2 are -inf) stay -inf."""
    g = torch.Generator().manual_seed(7)
    n, hidden, vocab, k = 9, 16, 100, 5  # one 16-row block: 7 programs
    h = torch.randn(n, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g)
    b = torch.zeros(vocab)
    b[:48] = float("-inf")
    tied = torch.tensor([50, 57, 61, 64, 70, 77, 83, 90, 99])
    b[tied] = 300.0
    tf, inv_tau = LogitTransform(scale=0.7, softcap=2.5), 1 / 1.3
    z = tf.apply(h.double() @ w.double().T + b.double()) * inv_tau
    raw = (h.double() @ w.double().T) * 0.7 / 2.5
    assert raw.abs().max() < 8  # unsaturated entries stay clear of fp32's saturation (|x| > 8.66): same ties
    y = torch.randint(48, vocab, (n,), generator=g)
    want_vals, want_idx = topk_lower_id(z, k)
    assert torch.equal(want_idx.sort(1).values, tied[:k].expand(n, k))  # the cut falls inside the ties
    for impl in ("fused", "two_pass"):
        st = fused_linear_stats(h.to(DEVICE), w.to(DEVICE), b.to(DEVICE), y.to(DEVICE), vocab=vocab, inv_tau=inv_tau,
                                top_k=k, n_splits=7, impl=impl, transform=tf)
        torch.testing.assert_close(st.lse.double().cpu(), z.logsumexp(1), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(st.target_logit.double().cpu(), z.gather(1, y[:, None]).squeeze(1), rtol=1e-6,
                                   atol=1e-6)
        assert torch.equal(st.topk_idx.cpu().sort(1).values, want_idx.sort(1).values)
        torch.testing.assert_close(st.topk_vals.double().cpu().sort(1).values, want_vals.sort(1).values)


# --- the loss against the reference -----------------------------------------------------------------------------

@pytest.mark.parametrize("preset", PRESETS)
def test_presets_with_ce_temperature_padding_and_masks(preset):
    """Student: multiplier + soft-cap; teacher: multiplier; self: the student's (the default)."""
    inp = _to(make_inputs(vt=41, logit_scale=4.0, hard_labels=True), torch.float32)  # Vt > V, 25 % masked
    inp.extra = dict(student_transform=STUDENT_TF, teacher_transform=TEACHER_TF)
    cfg = RouteConfig.preset(preset, top_k=6, chunk_size=7, ce_weight=0.3, temperature=1.4)
    out, _ = _compare(inp, cfg)
    assert (torch.bincount(out.route[out.route >= 0].cpu(), minlength=4) > 0).all()
    _assert_transform_matters(inp, cfg, out)


def test_custom_table_self_weight_and_every_model_its_own_transform():
    routes = {
        "LH": ("teacher", "fkl", "topk", 0.5),
        "LL": ("self", "jsd", "full", "beta_weak"),
        "HT": RouteSpec("teacher", "rkl", "sampled", 2.0),
        "HS": ("self", "rkl", "topk"),
    }
    inp = make_inputs(lead=(4, 9), vt=40, hard_labels=True, logit_scale=3.0)
    g = torch.Generator().manual_seed(5)
    inp.extra = dict(
        self_weight=inp.student_weight + 0.3 * torch.randn(inp.student_weight.shape, generator=g, dtype=torch.float64),
        self_bias=0.2 * torch.randn(inp.student_weight.shape[0], generator=g, dtype=torch.float64),
        student_transform=LogitTransform(scale=1.3, softcap=4.0),
        # Caps the logits reach but do not saturate in fp32 (tanh is exactly 1 in fp32 from |x| ~ 9, in
        # float64 from 19: such ties at the top-K cut are fp32's own, the PyTorch path in fp32 has them too).
        teacher_transform=LogitTransform(softcap=8.0),
        self_transform=LogitTransform(scale=0.8, softcap=3.0),
    )
    inp = _to(inp, torch.float32)
    cfg = RouteConfig(routes=routes, top_k=4, jsd_beta=0.3, ce_weight=0.2, chunk_size=5, temperature=0.7)
    out, _ = _compare(inp, cfg)
    assert (torch.bincount(out.route[out.route >= 0].cpu(), minlength=4) > 0).all()
    inp.extra["self_transform"] = LogitTransform(scale=0.8)  # the self's own transform is the one used
    assert not torch.allclose(run_backend(inp, "triton", cfg)[0].q_self, out.q_self)


@pytest.mark.parametrize("preset,dtype", [("dopd", torch.bfloat16), ("gkd", torch.bfloat16),
                                          ("vanilla_opd", torch.float16)])
def test_half_precision_inputs(preset, dtype):
    """bf16 / fp16 models, fp32 in the kernels (fp16: the backward GEMMs' power-of-two scale after the slope)."""
    inp = _to(make_inputs(vt=40, logit_scale=3.0, hard_labels=True), dtype)
    inp.extra = dict(student_transform=STUDENT_TF, teacher_transform=LogitTransform(scale=1.2, softcap=6.0))
    out, _ = _compare(inp, RouteConfig.preset(preset, top_k=5, chunk_size=8, ce_weight=0.1), dtype)
    assert out.per_token_loss.dtype == torch.float32


@pytest.mark.parametrize("preset,top_k", [("dopd", 20), ("gkd", 5), ("vanilla_opd_sampled", 5)])
def test_minus_inf_biases_under_a_softcap(preset, top_k):
    """-inf biases stay -inf through the cap (tanh alone would make them -softcap): ids 0-15 are the first
    vocabulary tile of every kernel, ids 32-36 the whole second statistics split, plus two more. Values and
    gradients finite and equal to the reference; the masked entries get exactly zero gradient; with top_k=20
    of 14 finite entries the cut falls among the -inf entries (ties, to the lower id). No masked tokens: the
    reference points them at id 0, -inf here, and its autograd then gives NaN gradients."""
    inp = make_inputs(vt=37, mask_frac=0.0, logit_scale=3.0, hard_labels=True)
    banned = torch.cat([torch.arange(16), torch.arange(32, 37), torch.tensor([20, 25])])
    inp.student_bias[banned] = float("-inf")
    inp.teacher_bias[banned] = float("-inf")
    finite = torch.tensor([i for i in range(37) if i not in set(banned.tolist())])
    for name in ("target_ids", "hard_labels"):
        ids = getattr(inp, name)
        setattr(inp, name, torch.where((ids >= 0) & torch.isin(ids, banned), finite[ids.clamp_min(0) % len(finite)],
                                       ids))
    inp.extra = dict(student_transform=STUDENT_TF, teacher_transform=LogitTransform(softcap=4.0))
    inp = _to(inp, torch.float32)
    cfg = RouteConfig.preset(preset, top_k=top_k, chunk_size=6, ce_weight=0.2)
    out, _ = _compare(inp, cfg)
    _, d_h, d_w, d_b = run_backend(inp, "triton", cfg)
    assert torch.isfinite(out.loss) and torch.isfinite(out.per_token_loss).all()
    assert torch.isfinite(d_h).all() and torch.isfinite(d_w).all() and torch.isfinite(d_b).all()
    assert (d_w[banned] == 0).all() and (d_b[banned] == 0).all()


def test_saturated_caps_tie_across_the_topk_cut():
    """Teacher and self logits far above their caps on 8 ids (exactly +softcap in fp32 and float64), K = 5: the
    sources' top-K cut falls inside the ties and must take the 5 lowest ids, as the reference does. The
    student (its own unsaturated cap) has distinct logits on those ids, so another pick changes the loss."""
    inp = make_inputs(lead=(4, 9), vt=40, hard_labels=True)
    tied = torch.tensor([3, 6, 8, 14, 19, 22, 27, 33])
    g = torch.Generator().manual_seed(3)
    inp.teacher_bias[tied] += 300.0
    self_bias = inp.student_bias.clone()
    self_bias[tied] += 300.0
    inp.extra = dict(self_weight=inp.student_weight + 0.2 * torch.randn(inp.student_weight.shape, generator=g,
                                                                       dtype=torch.float64),
                     self_bias=self_bias, student_transform=LogitTransform(softcap=4.0),
                     teacher_transform=LogitTransform(scale=0.25, softcap=2.0),
                     self_transform=LogitTransform(softcap=3.0))
    # Preconditions: every unsaturated entry is well inside fp32's tanh range (|x| < 8), so that fp32 and
    # float64 see the same ties; every valid row's K-th value is tied with more entries than K slots.
    rows = inp.mask.reshape(-1)
    for hidden, weight, bias, tf in (
            (inp.teacher_hidden, inp.teacher_weight[:37], inp.teacher_bias[:37], inp.extra["teacher_transform"]),
            (inp.self_hidden, inp.extra["self_weight"], self_bias, inp.extra["self_transform"])):
        raw = (hidden.reshape(-1, hidden.shape[-1]) @ weight.T + bias)[rows]
        x = raw * tf.scale / tf.softcap
        assert (x[:, tied] > 25).all() and x[:, [i for i in range(37) if i not in tied]].abs().max() < 8
        z = tf.apply(raw)
        kth = z.topk(5).values[:, -1:]
        assert ((z == kth).sum(1) > 5).all()
    z_s = (inp.student_hidden.reshape(-1, 12) @ inp.student_weight.T + inp.student_bias)[rows][:, tied]
    assert (z_s.std(1) > 0.1).all()
    inp = _to(inp, torch.float32)
    for cfg in (RouteConfig(top_k=5, chunk_size=4, ce_weight=0.1), RouteConfig.preset("opsd", top_k=5)):
        _compare(inp, cfg)


def test_two_pass_statistics_with_transforms(monkeypatch):
    """The statistics pass in its two-pass mode: the soft-cap in the logit GEMM's epilogue (-inf biases kept),
    then the statistics kernel's identity variant on the stored logits; N = 40 rows, two 32-row chunks."""
    from dopd_kernels.triton import blocks, stats

    monkeypatch.setattr(blocks, "INTERPRETER_BLOCKS",
                        dataclasses.replace(blocks.INTERPRETER_BLOCKS, stats_impl="two_pass"))
    monkeypatch.setattr(blocks, "GPU_BLOCKS", dataclasses.replace(blocks.GPU_BLOCKS, stats_impl="two_pass"))
    calls = []
    original = stats.matmul_into

    def counted(*args, **kwargs):
        calls.append(kwargs["transform"])
        return original(*args, **kwargs)

    monkeypatch.setattr(stats, "matmul_into", counted)
    inp = make_inputs(lead=(4, 10), vt=40, logit_scale=3.0)
    inp.student_bias[[5, 30]] = float("-inf")
    inp.teacher_bias[[5, 30]] = float("-inf")
    inp.target_ids = torch.where(torch.isin(inp.target_ids, torch.tensor([5, 30])), 6, inp.target_ids)
    inp.extra = dict(student_transform=STUDENT_TF, teacher_transform=LogitTransform(scale=0.8, softcap=3.0))
    _compare(_to(inp, torch.float32), RouteConfig.preset("dopd", top_k=6, temperature=1.3))
    # self, teacher and the student's lazy log-probs, 32 + 8 rows each
    assert len(calls) == 6 and all(c.softcap for c in calls)


def test_float64_inputs_take_the_pytorch_path_with_their_transforms():
    inp = make_inputs(hard_labels=True)
    inp.extra = dict(student_transform=STUDENT_TF, teacher_transform=TEACHER_TF,
                     self_transform=LogitTransform(softcap=3.0))
    cfg = RouteConfig(top_k=5, chunk_size=6, ce_weight=0.2)
    tri, torch_ = run_backend(inp, "triton", cfg), run_backend(inp, "torch", cfg)
    assert torch.equal(tri[0].loss, torch_[0].loss) and torch.equal(tri[2], torch_[2])
    _assert_transform_matters(inp, cfg, tri[0])


# --- backend="auto": the self-check mirrors the call's transforms ----------------------------------------------

TINY = (2, 7, 16, 24, 37, 3)  # as tests/test_selfcheck.py: quick under the interpreter
CALL_TFS = (STUDENT_TF, LogitTransform(softcap=3.0), LogitTransform(scale=0.5))


def test_the_self_check_runs_the_call_transforms(monkeypatch):
    import dopd_kernels.triton as tri

    seen = []
    original = tri.triton_routed_loss

    def spy(*args, **kwargs):
        seen.append(tuple(kwargs[f"{m}_transform"] for m in ("student", "teacher", "self")))
        return original(*args, **kwargs)

    monkeypatch.setattr(tri, "triton_routed_loss", spy)
    call = selfcheck.CallShape(transforms=CALL_TFS)
    assert selfcheck.check(torch.device(DEVICE), RouteConfig.preset("dopd", ce_weight=0.1), torch.float32, shape=TINY,
                           call=call) is None
    assert seen == [CALL_TFS]


def test_auto_hands_the_call_transforms_to_the_self_check(monkeypatch):
    """routed_loss(backend="auto") describes its transforms to the check (self defaults to the student's), and
    on a (stand-in) CUDA device whose check passes it runs the Triton path with them."""
    calls = []

    def resolve(backend, device, config, dtype, call):
        calls.append(call)
        return "triton"

    monkeypatch.setattr(api, "_resolve_backend", resolve)
    inp = _to(make_inputs(), torch.float32)
    out = routed_loss(*inp.args(), **inp.kwargs(), student_transform=STUDENT_TF, teacher_transform=TEACHER_TF,
                      config=RouteConfig(top_k=5))
    assert calls[0].transforms == (STUDENT_TF, TEACHER_TF, STUDENT_TF)
    ref = routed_loss(*inp.args(), **inp.kwargs(), student_transform=STUDENT_TF, teacher_transform=TEACHER_TF,
                      config=RouteConfig(top_k=5), backend="reference")
    assert rel_err(out.loss, ref.loss) < 1e-5
