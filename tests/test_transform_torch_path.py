"""LogitTransform on the PyTorch path against the float64 reference: every preset and route kind, per-model
transforms, padding, masks, -inf entries, saturated soft-caps (top-K ties), dtypes, temperature, shapes,
gradcheck; and the two in-place primitives against autograd of ``LogitTransform.apply``."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck

from dopd_kernels import (PRESETS, LogitTransform, RoutedDistillationLoss, RouteConfig, RouteSpec, routed_loss,
                          routed_loss_from_logits)
from dopd_kernels.topk import _lower_ids_at_cut, topk_lower_id

from _inputs import assert_outputs_close, make_inputs, rel_err, run_backend

TOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 1e-2}
#: Gemma-2-like student (scale, then a cap the logits reach), Cohere/Granite-like teacher (scale only).
STUDENT_TF = LogitTransform(scale=1.7, softcap=5.0)
TEACHER_TF = LogitTransform(scale=0.6)


def _compare(inp, config, dtype):
    ref = run_backend(inp, "reference", config, upcast=True)
    out = run_backend(inp, "torch", config)
    assert_outputs_close(out[0], ref[0], out[1:], ref[1:], TOL[dtype])
    return out[0], ref[0]


def _assert_transform_matters(inp, config, out):
    """The transform changes the loss: a path that ignored it would fail the comparison above."""
    plain = dict(inp.extra)
    inp.extra = {k: v for k, v in plain.items() if not k.endswith("_transform")}
    try:
        base = run_backend(inp, "torch", config)[0]
    finally:
        inp.extra = plain
    assert rel_err(base.loss, out.loss) > 1e-3


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_presets_with_ce_padding_and_masks(preset, dtype):
    inp = make_inputs(dtype=dtype, vt=41, logit_scale=4.0, hard_labels=True)  # Vt > V, 25% masked
    inp.extra = dict(student_transform=STUDENT_TF, teacher_transform=TEACHER_TF)  # self: the student's
    cfg = RouteConfig.preset(preset, top_k=6, chunk_size=7, ce_weight=0.3, temperature=1.4)
    out, _ = _compare(inp, cfg, dtype)
    counts = torch.bincount(out.route[out.route >= 0], minlength=4)
    assert (counts > 0).all(), f"inputs must hit every route, got {counts.tolist()}"
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
        teacher_transform=LogitTransform(softcap=2.5),
        self_transform=LogitTransform(scale=0.8, softcap=3.0),
    )
    cfg = RouteConfig(routes=routes, top_k=4, jsd_beta=0.3, ce_weight=0.2, chunk_size=5, temperature=0.7)
    out, _ = _compare(inp, cfg, torch.float64)
    assert (torch.bincount(out.route[out.route >= 0], minlength=4) > 0).all()
    _assert_transform_matters(inp, cfg, out)
    # self_transform is used: changing it changes the self statistics.
    inp.extra["self_transform"] = LogitTransform(scale=0.8)
    assert not torch.allclose(run_backend(inp, "torch", cfg)[0].q_self, out.q_self)


@pytest.mark.parametrize("preset", ["dopd", "gkd", "vanilla_opd_sampled"])
def test_bf16_inputs(preset):
    inp = make_inputs(dtype=torch.bfloat16, vt=40, logit_scale=3.0)
    inp.extra = dict(student_transform=STUDENT_TF, teacher_transform=LogitTransform(scale=1.2, softcap=6.0))
    out, _ = _compare(inp, RouteConfig.preset(preset, top_k=5, chunk_size=8), torch.bfloat16)
    assert out.per_token_loss.dtype == torch.float32  # fp32 accumulation


@pytest.mark.parametrize("preset", ["dopd", "gkd", "vanilla_opd", "sdpo", "opsd"])
@pytest.mark.parametrize("top_k", [5, 36])
def test_minus_inf_bias_with_softcap_stays_masked(preset, top_k):
    """-inf biases stay -inf through the cap (tanh would make them -softcap): finite values and gradients,
    equal to the reference; with top_k=36 of 37 the cut falls among the -inf entries (ties)."""
    inp = make_inputs(vt=37, mask_frac=0.1, logit_scale=3.0)
    banned = torch.tensor([3, 17, 30])
    inp.student_bias[banned] = float("-inf")
    inp.teacher_bias[banned] = float("-inf")
    inp.target_ids = torch.where(torch.isin(inp.target_ids, banned), 0, inp.target_ids)
    inp.extra = dict(student_transform=STUDENT_TF, teacher_transform=LogitTransform(softcap=4.0))
    cfg = RouteConfig.preset(preset, top_k=top_k, chunk_size=6)
    out, ref = _compare(inp, cfg, torch.float64)
    assert torch.isfinite(out.loss) and torch.isfinite(out.per_token_loss).all()
    h, w, b = inp.fresh_leaves()
    routed_loss(h, w, *inp.args()[2:], student_bias=b, teacher_bias=inp.teacher_bias, config=cfg, backend="torch",
                **inp.extra).loss.backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all() and torch.isfinite(b.grad).all()
    assert (b.grad[banned] == 0).all() and (w.grad[banned] == 0).all()  # a masked entry gets no gradient


def _saturated_inputs(dtype):
    """Logits of magnitude ~100-1000 under caps of 2-3: most entries sit exactly at +-softcap (ties)."""
    inp = make_inputs(lead=(4, 9), vt=40, logit_scale=200.0, dtype=dtype, hard_labels=True)
    inp.extra = dict(student_transform=LogitTransform(softcap=3.0),
                     teacher_transform=LogitTransform(scale=2.0, softcap=2.0))
    return inp


def test_saturated_softcap_ties_pick_the_lower_id_like_the_reference():
    inp = _saturated_inputs(torch.float64)
    cfg = RouteConfig(top_k=5, chunk_size=4, ce_weight=0.1)
    # Non-vacuous: at the top-K cut of the teacher and of the self, more entries tie than there are slots.
    sources = ((inp.teacher_hidden, inp.teacher_weight[:37], inp.teacher_bias[:37], inp.extra["teacher_transform"]),
               (inp.self_hidden, inp.student_weight, inp.student_bias, inp.extra["student_transform"]))
    for hidden, weight, bias, tf in sources:
        z = tf.apply(hidden.reshape(-1, hidden.shape[-1]) @ weight.T + bias)
        kth = z.topk(5).values[:, -1:]
        ambiguous = ((z == kth).sum(1) > (z.topk(5).values == kth).sum(1)).sum()
        assert ambiguous >= 10, "the inputs must put ties across the top-K cut"
    out, _ = _compare(inp, cfg, torch.float64)
    assert (torch.bincount(out.route[out.route >= 0], minlength=4) > 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_saturated_softcap_values_and_gradients(dtype):
    """Where the cap saturates the derivative is ~0 (no NaN, no overflow). top_k >= V: float32 saturates
    earlier than float64 (ties that are not ties in the reference), so this case keeps the cut out."""
    inp = _saturated_inputs(dtype)
    for preset in ("dopd", "gkd", "vanilla_opd_sampled"):
        _compare(inp, RouteConfig.preset(preset, top_k=500, chunk_size=5, ce_weight=0.2), dtype)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_divides_after_the_transform(temperature):
    """Against logits transformed by hand and then divided by tau in the reference's own code."""
    inp = make_inputs(vt=41, logit_scale=4.0)
    inp.extra = dict(student_transform=STUDENT_TF, teacher_transform=LogitTransform(scale=0.5, softcap=7.0))
    cfg = RouteConfig(top_k=6, chunk_size=7, temperature=temperature)
    out, _ = _compare(inp, cfg, torch.float64)
    # Folding tau into the transform's scale is NOT the same thing under a soft-cap.
    folded = dict(student_transform=LogitTransform(scale=1.7 / temperature, softcap=5.0),
                  teacher_transform=LogitTransform(scale=0.5 / temperature, softcap=7.0))
    wrong = routed_loss(*inp.args(), **inp.kwargs() | folded, config=RouteConfig(top_k=6, chunk_size=7),
                        backend="torch")
    assert rel_err(wrong.loss, out.loss) > 1e-3


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 3),
    t=st.integers(1, 6),
    hs=st.integers(1, 8),
    ht=st.integers(1, 8),
    vocab=st.integers(2, 23),
    pad=st.integers(0, 4),
    top_k=st.integers(1, 25),
    chunk=st.integers(1, 8),
    mask_frac=st.sampled_from([0.0, 0.3]),
    preset=st.sampled_from(PRESETS),
    # Multipliers <= 1 (larger ones are in the tests above): tokens whose log-prob is -1e-12 have no
    # relative precision to compare at 1e-9, and tiny hidden sizes with large logits make them.
    scales=st.tuples(*[st.sampled_from([0.25, 0.5, 1.0])] * 3),
    caps=st.tuples(*[st.sampled_from([None, 0.5, 4.0, 30.0])] * 3),
    temperature=st.sampled_from([1.0, 1.5]),
    seed=st.integers(0, 2**16),
)
def test_any_shape_and_transform(b, t, hs, ht, vocab, pad, top_k, chunk, mask_frac, preset, scales, caps,
                                 temperature, seed):
    inp = make_inputs(lead=(b, t), hs=hs, ht=ht, vocab=vocab, vt=vocab + pad, mask_frac=mask_frac, seed=seed)
    inp.extra = {f"{m}_transform": LogitTransform(scale=s, softcap=c)
                 for m, s, c in zip(("student", "teacher", "self"), scales, caps)}
    cfg = RouteConfig.preset(preset, top_k=top_k, chunk_size=chunk, temperature=temperature)
    ref = run_backend(inp, "reference", cfg)
    out = run_backend(inp, "torch", cfg)
    assert_outputs_close(out[0], ref[0], out[1:], ref[1:], 1e-9)


@pytest.mark.parametrize("preset", ["dopd", "gkd", "opsd"])
def test_gradcheck_through_a_softcap(preset):
    inp = make_inputs(lead=(2, 5), hs=5, ht=7, vocab=9, vt=11, mask_frac=0.2, hard_labels=True, logit_scale=3.0)
    cfg = RouteConfig.preset(preset, top_k=4, chunk_size=3, ce_weight=0.3, temperature=1.3)
    tf = LogitTransform(scale=1.5, softcap=2.0)  # logits of a few units: tanh well inside its curve

    def loss(h, w, b):
        return routed_loss(
            h, w, inp.teacher_hidden, inp.teacher_weight, inp.self_hidden, inp.target_ids, inp.mask,
            student_bias=b, teacher_bias=inp.teacher_bias, self_weight=inp.student_weight.detach().clone(),
            self_bias=inp.student_bias.detach().clone(), hard_labels=inp.hard_labels, config=cfg, backend="torch",
            student_transform=tf, teacher_transform=LogitTransform(softcap=3.0),
        ).loss

    assert gradcheck(loss, tuple(inp.fresh_leaves()), eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=True)


def test_module_forwards_the_transform_keywords():
    inp = make_inputs()
    kw = dict(student_transform=STUDENT_TF, teacher_transform=TEACHER_TF, self_transform=LogitTransform(scale=2.0))
    module = RoutedDistillationLoss(RouteConfig(top_k=4), backend="torch")
    got = module(*inp.args(), **inp.kwargs(), **kw)
    want = routed_loss(*inp.args(), **inp.kwargs(), **kw, config=RouteConfig(top_k=4), backend="torch")
    assert torch.equal(got.loss, want.loss) and torch.equal(got.q_self, want.q_self)
    assert not torch.allclose(got.loss, module(*inp.args(), **inp.kwargs()).loss)


def test_identity_transform_is_bitwise_the_plain_path():
    inp = make_inputs(hard_labels=True)
    cfg = RouteConfig(top_k=5, chunk_size=6, ce_weight=0.2, temperature=1.3)
    plain = run_backend(inp, "torch", cfg)
    inp.extra = dict(student_transform=LogitTransform(scale=1.0), teacher_transform=LogitTransform())
    same = run_backend(inp, "torch", cfg)
    assert torch.equal(plain[0].loss, same[0].loss)
    assert all(torch.equal(a, b) for a, b in zip(plain[1:], same[1:]))


# --- the primitives: LogitTransform.apply_ / chain_grad_ and topk_lower_id ---------------------------------

@pytest.mark.parametrize("tf", [LogitTransform(), LogitTransform(scale=0.3), LogitTransform(scale=2.0, softcap=3.0),
                                LogitTransform(softcap=0.5)], ids=repr)
@pytest.mark.parametrize("inv_tau", [1.0, 0.6])
@pytest.mark.parametrize("bias_kind", ["none", "columns", "entries"])  # (V,) as in a chunk, (C, K) as gathered
def test_apply_and_chain_grad_match_autograd(tf, inv_tau, bias_kind):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 11, generator=g, dtype=torch.float64) * 4.0
    z[:, 0] = 500.0  # saturated
    bias = {"none": None, "columns": torch.zeros(11, dtype=torch.float64),
            "entries": torch.zeros(6, 11, dtype=torch.float64)}[bias_kind]
    if bias_kind == "columns":
        bias[[3, 7]] = float("-inf")  # masked vocabulary entries
    elif bias_kind == "entries":
        bias[1, 3] = bias[4, 7] = bias[4, 8] = float("-inf")
    z = z if bias is None else z + bias
    dy = torch.randn(6, 11, generator=g, dtype=torch.float64)
    dy[torch.isneginf(z)] = 0.0  # a softmax-based loss sends no gradient to a -inf logit
    row_weight = torch.rand(6, generator=g, dtype=torch.float64)

    leaf = z.clone().requires_grad_()
    want = tf.apply(leaf) * inv_tau
    (want_grad,) = torch.autograd.grad(want, leaf, dy * row_weight[:, None])

    got = tf.apply_(z.clone(), inv_tau, bias)
    assert torch.equal(torch.isneginf(got), torch.isneginf(z))
    torch.testing.assert_close(got, want.detach(), rtol=1e-14, atol=1e-14)
    got_grad = tf.chain_grad_(dy.clone(), got if tf.grad_needs_logits else None, inv_tau, row_weight)
    assert torch.isfinite(got_grad).all()
    torch.testing.assert_close(got_grad, torch.nan_to_num(want_grad), rtol=1e-12, atol=1e-12)
    assert (got_grad[torch.isneginf(z)] == 0).all()


def test_topk_lower_id_breaks_ties_by_the_lower_id():
    z = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 3.0],
                      [-math.inf, 2.0, -math.inf, -math.inf, 5.0, -math.inf],
                      [7.0, 7.0, 7.0, 7.0, 7.0, 7.0]], dtype=torch.float32)
    vals, idx = topk_lower_id(z, 3)
    assert [sorted(r) for r in idx.tolist()] == [[1, 2, 4], [0, 1, 4], [0, 1, 2]]
    assert torch.equal(vals, z.gather(1, idx))
    g = torch.Generator().manual_seed(2)
    many = torch.randint(0, 4, (50, 300), generator=g).double()  # heavy ties: the stable sort is the rule
    many[:10] = torch.randn(10, 300, generator=g, dtype=torch.float64)  # rows without ties (topk's own answer)
    for k in (1, 7, 64, 300):
        want = torch.sort(many, dim=1, descending=True, stable=True).indices[:, :k].sort(1).values
        assert torch.equal(topk_lower_id(many, k)[1].sort(1).values, want)
        # The GPU branch fixes every row (no host sync to find the tied ones): same answer.
        kth = torch.topk(many, k, dim=1).values[:, -1:]
        assert torch.equal(_lower_ids_at_cut(many, kth, k)[1].sort(1).values, want)


# --- against the model classes' own forward logits (tiny configs built in code, float64) -------------------

_TINY = dict(vocab_size=53, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, initializer_range=0.3)
#: family -> (model class, config class, config fields, the LogitTransform its config asks for)
_FAMILIES = {
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(head_dim=16, final_logit_softcapping=2.0),
               lambda c: LogitTransform(softcap=c.final_logit_softcapping)),
    "cohere": ("CohereForCausalLM", "CohereConfig", dict(logit_scale=0.25),
               lambda c: LogitTransform(scale=c.logit_scale)),
    "granite": ("GraniteForCausalLM", "GraniteConfig", dict(logits_scaling=4.0),
                lambda c: LogitTransform(scale=1.0 / c.logits_scaling)),
    "falcon_h1": ("FalconH1ForCausalLM", "FalconH1Config",
                  dict(lm_head_multiplier=0.5, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_n_groups=1,
                       mamba_d_state=8, mamba_chunk_size=8),
                  lambda c: LogitTransform(scale=c.lm_head_multiplier)),
}


@pytest.mark.parametrize("family", sorted(_FAMILIES))
def test_model_class_logits(family):
    """routed_loss on the torch path from hidden states + lm_head + the config's transform equals the loss on
    the model's own forward logits (Gemma 2 soft-cap, Cohere logit_scale, Granite logits_scaling, Falcon-H1
    lm_head_multiplier): loss, fields, and the gradient of the student's lm_head."""
    transformers = pytest.importorskip("transformers")
    model_name, config_name, fields, transform_of = _FAMILIES[family]
    if not hasattr(transformers, model_name):
        pytest.skip(f"transformers {transformers.__version__} has no {model_name}")

    def build(seed):
        torch.manual_seed(seed)
        config = getattr(transformers, config_name)(**_TINY, **fields)
        return getattr(transformers, model_name)(config).to(torch.float64).eval()

    student, teacher = build(0), build(1)
    g = torch.Generator().manual_seed(3)
    ids, privileged, targets = (torch.randint(0, 53, (2, 7), generator=g) for _ in range(3))
    cfg = RouteConfig.preset("dopd", top_k=8, chunk_size=5, temperature=0.8)

    with torch.no_grad():
        h_s, h_p, h_t = (m.model(x).last_hidden_state
                         for m, x in ((student, ids), (student, privileged), (teacher, privileged)))
    w = student.lm_head.weight.detach().clone().requires_grad_()
    ours = routed_loss(h_s, w, h_t, teacher.lm_head.weight.detach(), h_p, targets, config=cfg, backend="torch",
                       student_transform=transform_of(student.config), teacher_transform=transform_of(teacher.config))
    ours.loss.backward()

    theirs = routed_loss_from_logits(student(ids).logits, teacher(privileged).logits.detach(),
                                     student(privileged).logits.detach(), targets, config=cfg)
    theirs.loss.backward()
    assert torch.equal(ours.route, theirs.route)
    assert rel_err(ours.loss, theirs.loss) < 1e-9
    for name in ("per_token_loss", "q_self", "q_teacher", "student_logprob"):
        assert rel_err(getattr(ours, name), getattr(theirs, name)) < 1e-9, name
    assert rel_err(w.grad, student.lm_head.weight.grad) < 1e-9
    assert not transform_of(student.config).is_identity
