"""The PyTorch path against the float64 reference: every preset, every route, loss and gradients."""

import pytest
import torch

from dopd_kernels import PRESETS, RouteConfig, RouteSpec, routed_loss

from _inputs import assert_outputs_close, make_inputs, run_backend

TOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _compare(inp, config, dtype, grad_tol=None):
    ref = run_backend(inp, "reference", config, upcast=True)
    out = run_backend(inp, "torch", config)
    assert_outputs_close(out[0], ref[0], out[1:], ref[1:], TOL[dtype], grad_tol)
    return out[0]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_presets_match_reference(preset, dtype):
    inp = make_inputs(dtype=dtype, vt=41)
    cfg = RouteConfig.preset(preset, top_k=6, chunk_size=7)
    out = _compare(inp, cfg, dtype)
    counts = torch.bincount(out.route[out.route >= 0], minlength=4)
    assert (counts > 0).all(), f"inputs must hit every route, got {counts.tolist()}"


@pytest.mark.parametrize("preset", ["dopd", "gkd", "vanilla_opd_sampled"])
def test_bf16_inputs(preset):
    inp = make_inputs(dtype=torch.bfloat16, vt=40)
    out = _compare(inp, RouteConfig.preset(preset, top_k=5, chunk_size=8), torch.bfloat16)
    assert out.per_token_loss.dtype == torch.float32  # fp32 accumulation


@pytest.mark.parametrize(
    "overrides",
    [
        dict(temperature=1.7),
        dict(temperature=0.6, normalize="zscore"),
        dict(normalize="none", trim=0.0),
        dict(trim=0.3, reduction="token_mean"),
        dict(reduction="sum", ce_weight=0.4),
        dict(jsd_beta=0.8, beta_light=1.1, beta_weak=0.05),
        dict(top_k=1),
        dict(top_k=500),  # clipped to V
        dict(chunk_size=1),
    ],
    ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()),
)
def test_config_knobs(overrides):
    inp = make_inputs(hard_labels=overrides.get("ce_weight", 0) > 0, vt=39)
    _compare(inp, RouteConfig(**overrides), torch.float64)


def test_custom_table_mixing_every_kind():
    routes = {
        "LH": ("teacher", "fkl", "topk", 0.5),
        "LL": {"source": "self", "divergence": "jsd", "support": "full", "weight": "beta_weak"},
        "HT": RouteSpec("teacher", "rkl", "sampled", 2.0),
        "HS": ("self", "fkl", "full"),
    }
    inp = make_inputs(lead=(4, 9), vt=40, hard_labels=True)
    _compare(inp, RouteConfig(routes=routes, top_k=4, jsd_beta=0.3, ce_weight=0.2, chunk_size=5), torch.float64)


def test_self_weight_and_bias_are_used_and_not_trained():
    inp = make_inputs(vt=37)
    g = torch.Generator().manual_seed(3)
    inp.extra = dict(self_weight=inp.student_weight + 0.3 * torch.randn(inp.student_weight.shape, generator=g, dtype=torch.float64),
                     self_bias=torch.randn(inp.student_weight.shape[0], generator=g, dtype=torch.float64))
    out = _compare(inp, RouteConfig(top_k=5), torch.float64)
    base = run_backend(make_inputs(vt=37), "torch", RouteConfig(top_k=5))[0]
    assert not torch.allclose(out.q_self, base.q_self), "self_weight must change the self pass"


def test_flat_inputs_equal_one_sequence():
    inp = make_inputs(lead=(29,), mask_frac=0.2)
    _compare(inp, RouteConfig(top_k=4), torch.float64)


def test_seq_mean_weights_sequences_equally():
    inp = make_inputs(lead=(2, 8), mask_frac=0.0, bias=False)
    inp.mask = torch.ones(2, 8, dtype=torch.bool)
    inp.mask[0, 2:] = False  # sequence 0 has 2 tokens, sequence 1 has 8
    out = routed_loss(*inp.args(), config=RouteConfig(top_k=4), backend="torch")
    ptl = out.per_token_loss
    expected = 0.5 * (ptl[0, :2].mean() + ptl[1].mean())
    assert torch.allclose(out.loss, expected, rtol=1e-12)


def test_no_grad_skips_gradients_and_matches():
    inp = make_inputs()
    with torch.no_grad():
        out = routed_loss(*inp.args(), config=RouteConfig(top_k=4), backend="torch", **inp.kwargs())
    ref = routed_loss(*inp.args(), config=RouteConfig(top_k=4), backend="reference", **inp.kwargs())
    assert not out.loss.requires_grad
    assert torch.allclose(out.loss, ref.loss, rtol=1e-12)


def test_frozen_weight_gets_no_gradient_but_hidden_does():
    inp = make_inputs()
    h = inp.student_hidden.clone().requires_grad_()
    out = routed_loss(h, inp.student_weight, *inp.args()[2:], config=RouteConfig(top_k=4), backend="torch")
    out.loss.backward()
    assert h.grad is not None and inp.student_weight.grad is None
