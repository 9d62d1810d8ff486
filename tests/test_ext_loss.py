"""The whole loss on the PyTorch path with the compiled ops against the float64 reference, every preset; the
switch (DOPD_EXT=0, ext.forced) that keeps the torch code; the Triton statistics pass in its "cuda" mode."""

import types

import pytest
import torch

import dopd_kernels.ext as ext_module
from dopd_kernels import PRESETS, RouteConfig, RouteSpec

from _ext import require_ext
from _inputs import FIELDS, assert_outputs_close, make_inputs, run_backend

OPS = ("row_stats", "full_divergence_", "topk_divergence")


@pytest.fixture
def calls(monkeypatch):
    """Counts of the op calls made through dopd_kernels.ext (the loss calls them by module attribute)."""
    require_ext()
    counts = {name: 0 for name in OPS}
    for name in OPS:
        real = getattr(ext_module, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(ext_module, name, counted)
    return counts


def _compare(inp, config, tol=1e-5):
    ref = run_backend(inp, "reference", config, upcast=True)
    out = run_backend(inp, "torch", config)
    assert_outputs_close(out[0], ref[0], out[1:], ref[1:], tol)
    return out


EXPECTED = {  # the ops each preset's fp32 loss must reach (top-K routes, full-support routes)
    "dopd": {"row_stats", "full_divergence_", "topk_divergence"},
    "vanilla_opd": {"row_stats", "full_divergence_"},
    "vanilla_opd_sampled": {"row_stats"},  # sampled rows stay on the torch code
    "gkd": {"row_stats", "full_divergence_"},
    "opsd": {"row_stats", "topk_divergence"},
    "sdpo": {"row_stats", "full_divergence_"},
}


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_with_the_ops_match_reference(calls, preset):
    inp = make_inputs(dtype=torch.float32, lead=(4, 13), vocab=53, vt=61)
    with ext_module.forced(True):
        out = _compare(inp, RouteConfig.preset(preset, top_k=6, chunk_size=7))
        out[0].student_logprob  # the lazy log-prob: row_stats on the rows the loss pass did not cover
    assert {name for name, n in calls.items() if n} == EXPECTED[preset], calls
    counts = torch.bincount(out[0].route[out[0].route >= 0], minlength=4)
    assert (counts > 0).all(), f"inputs must hit every route, got {counts.tolist()}"


@pytest.mark.parametrize(
    "overrides",
    [dict(temperature=1.7), dict(reduction="sum", ce_weight=0.4), dict(jsd_beta=0.8, top_k=1), dict(top_k=500),
     dict(chunk_size=1), dict(reduction="token_mean", trim=0.3)],
    ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()),
)
def test_knobs_with_the_ops(calls, overrides):
    inp = make_inputs(dtype=torch.float32, hard_labels=overrides.get("ce_weight", 0) > 0, vt=39)
    with ext_module.forced(True):
        _compare(inp, RouteConfig(**overrides))
    assert calls["row_stats"] and calls["topk_divergence"]


def test_custom_table_mixing_every_kind(calls):
    routes = {
        "LH": ("teacher", "fkl", "topk", 0.5),
        "LL": {"source": "self", "divergence": "jsd", "support": "full", "weight": "beta_weak"},
        "HT": RouteSpec("teacher", "rkl", "sampled", 2.0),
        "HS": ("self", "fkl", "full"),
    }
    inp = make_inputs(lead=(4, 9), vt=40, dtype=torch.float32)
    with ext_module.forced(True):
        _compare(inp, RouteConfig(routes=routes, top_k=4, jsd_beta=0.3, chunk_size=5))
    assert all(calls.values()), calls


@pytest.mark.parametrize("preset", ["dopd", "vanilla_opd", "opsd"])
def test_logit_transforms_with_the_ops(calls, preset):
    """Soft-capped, scaled student and teacher (Gemma-2 / Granite style) with -inf student-bias entries: the ops
    take the cap's derivative and the multiplier, and the loss still matches the float64 reference."""
    from dopd_kernels import LogitTransform

    inp = make_inputs(dtype=torch.float32, lead=(4, 13), vocab=53, vt=61, logit_scale=4.0)
    inp.student_bias[[3, 17, 40]] = float("-inf")  # never sampled targets (they have no probability)
    inp.target_ids = torch.where(torch.isin(inp.target_ids, torch.tensor([3, 17, 40])), 0, inp.target_ids)
    inp.extra = dict(student_transform=LogitTransform(scale=1.7, softcap=5.0),
                     teacher_transform=LogitTransform(scale=0.6, softcap=9.0))
    with ext_module.forced(True):
        out = _compare(inp, RouteConfig.preset(preset, top_k=6, chunk_size=7, temperature=1.3))
    assert {name for name, n in calls.items() if n} == EXPECTED[preset], calls
    assert torch.isfinite(out[0].loss)


def test_bf16_inputs_with_the_ops(calls):
    inp = make_inputs(dtype=torch.bfloat16, vt=40)
    with ext_module.forced(True):
        _compare(inp, RouteConfig.preset("dopd", top_k=5, chunk_size=8), tol=1e-2)
    # bf16 heads stay bf16 (converted per vocabulary block inside the GEMMs): the ops run on the fp32 chunk
    # logits (statistics, full rows); the top-K op reads W itself and needs fp32, so those rows take torch code.
    assert calls["row_stats"] and calls["full_divergence_"] and not calls["topk_divergence"]


def test_no_grad_with_the_ops(calls):
    inp = make_inputs(dtype=torch.float32)
    from dopd_kernels import routed_loss

    with torch.no_grad(), ext_module.forced(True):
        out = routed_loss(*inp.args(), config=RouteConfig(top_k=4), backend="torch", **inp.kwargs())
    ref = routed_loss(*inp.args(), config=RouteConfig(top_k=4), backend="reference", **inp.kwargs())
    assert not out.loss.requires_grad and calls["topk_divergence"]
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=1e-5, atol=0)


@pytest.mark.parametrize("how", ["env", "forced"])
def test_switched_off_the_torch_code_runs(calls, monkeypatch, how):
    inp = make_inputs(dtype=torch.float32, vt=41)
    cfg = RouteConfig.preset("dopd", top_k=6, chunk_size=7)
    if how == "env":
        monkeypatch.setenv("DOPD_EXT", "0")
        assert not ext_module.enabled()
        _compare(inp, cfg)
    else:
        with ext_module.forced(False):
            _compare(inp, cfg)
    assert not any(calls.values()), calls


def test_float64_never_calls_the_ops(calls):
    inp = make_inputs(dtype=torch.float64, vt=41)
    with ext_module.forced(True):
        _compare(inp, RouteConfig.preset("dopd", top_k=6), tol=1e-9)
    assert not any(calls.values()), "float64 stays on the torch code (exact at 1e-9)"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("preset", ["dopd", "gkd", "opsd"])
def test_cuda_tensors_with_the_ops_match_reference(calls, preset):
    if not ext_module.has_cuda():
        pytest.skip("the extension was built without CUDA kernels (no nvcc?)")
    inp = make_inputs(dtype=torch.float32, lead=(4, 13), vocab=53, vt=61)
    cfg = RouteConfig.preset(preset, top_k=6, chunk_size=7)
    ref = run_backend(inp, "reference", cfg, upcast=True)
    for name in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight", "self_hidden", "target_ids",
                 "mask", "student_bias", "teacher_bias"):
        setattr(inp, name, getattr(inp, name).cuda())
    with ext_module.forced(True):
        out = run_backend(inp, "torch", cfg)
    on_cpu = types.SimpleNamespace(route=out[0].route.cpu(), loss=out[0].loss.detach().cpu(),
                                   **{name: getattr(out[0], name).cpu() for name in FIELDS})
    assert_outputs_close(on_cpu, ref[0], [g.cpu() for g in out[1:]], ref[1:], 1e-5)
    assert calls["row_stats"]


@pytest.mark.parametrize("transform", [None, (0.5, None), (0.5, 3.0)], ids=["identity", "scale", "softcap"])
@pytest.mark.parametrize("device", ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
def test_triton_statistics_in_cuda_mode_match_the_fused_kernel(device, transform):
    pytest.importorskip("triton")
    from dopd_kernels import LogitTransform

    tf = LogitTransform() if transform is None else LogitTransform(scale=transform[0], softcap=transform[1])
    require_ext()
    if device == "cuda" and not ext_module.has_cuda():
        pytest.skip("the extension was built without CUDA kernels (no nvcc?)")
    from dopd_kernels.triton.stats import fused_linear_stats

    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(37, 24, generator=g).to(device), torch.randn(61, 24, generator=g).to(device)
    b, y = torch.randn(61, generator=g).to(device), torch.randint(0, 53, (37,), generator=g).to(device)
    w[7] = w[3]  # exact ties between ids 3 and 7
    b[11] = float("-inf")  # a masked entry stays -inf under the soft-cap
    ref = fused_linear_stats(h, w, b, y, vocab=53, inv_tau=0.7, top_k=5, impl="fused", transform=tf)
    out = fused_linear_stats(h, w, b, y, vocab=53, inv_tau=0.7, top_k=5, impl="cuda", transform=tf)
    torch.testing.assert_close(out.lse, ref.lse)
    torch.testing.assert_close(out.target_logit, ref.target_logit)
    torch.testing.assert_close(out.topk_vals, ref.topk_vals)
    assert torch.equal(out.topk_idx, ref.topk_idx)


def test_a_transposed_weight_view_takes_the_torch_code_for_top_k_rows(calls):
    """A head stored as (H, V) and passed as ``.T`` has no unit stride along H: the top-K op cannot read its rows,
    so those rows keep the torch code instead of raising; the statistics still use the ops."""
    inp = make_inputs(dtype=torch.float32, vt=40)
    inp.student_weight = inp.student_weight.T.contiguous().T
    assert inp.student_weight.stride(1) != 1
    with ext_module.forced(True):
        _compare(inp, RouteConfig.preset("dopd", top_k=5, chunk_size=8))
    assert calls["row_stats"] and not calls["topk_divergence"]
