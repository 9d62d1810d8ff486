"""backend="auto"'s one-time self-check of the Triton kernels against the PyTorch path (selfcheck.py).

The comparison itself runs for real on the CPU (Triton's interpreter) at a small shape; the CUDA-only
decision logic (warn once, fall back, the environment switch) is driven with a stand-in CUDA device.
"""

import warnings

import pytest
import torch

pytest.importorskip("triton")

from dopd_kernels import LogitTransform, RouteConfig, api, selfcheck  # noqa: E402
from dopd_kernels.transform import IDENTITY  # noqa: E402

# The interpreter evaluates masked-out lanes too (log(0) there): numpy RuntimeWarnings, never used values.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
CUDA0 = torch.device("cuda", 0)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TINY = (2, 7, 16, 24, 37, 3)  # sequences, tokens, Hs, Ht, V, teacher padding: quick under the interpreter
ROUTED = (2, 32, 16, 24, 37, 3)  # enough tokens (~58 valid) that one flipped route is a near-tie (< 2 %)


@pytest.fixture
def fresh(monkeypatch):
    """No cached verdicts, Triton 'available', no capture, the check enabled."""
    monkeypatch.setattr(selfcheck, "_results", {})
    monkeypatch.setattr(selfcheck, "_failed", set())
    monkeypatch.setattr(api, "_triton_available", lambda: True)
    monkeypatch.setattr(selfcheck, "_capturing", lambda device: False)
    monkeypatch.delenv(selfcheck.ENV_VAR, raising=False)
    return monkeypatch


@pytest.mark.parametrize("preset,ce", [("dopd", 0.0), ("vanilla_opd_sampled", 0.2)])
def test_the_check_passes_when_the_paths_agree(preset, ce):
    """The real comparison (Triton, under the interpreter on a CPU machine, vs the PyTorch path) finds nothing."""
    assert selfcheck.check(DEVICE, RouteConfig.preset(preset, ce_weight=ce), torch.float32,
                           shape=TINY) is None


def test_the_check_mirrors_the_call():
    """No student bias, a teacher bias, a frozen head (d hidden only): the problem is built the same way, so
    it compiles the call's own kernel variants; and CallShape.of reads those facts off a call."""
    call = selfcheck.CallShape(student_bias=False, teacher_bias=True, grad_hidden=True, grad_weight=False,
                               grad_bias=False)
    assert selfcheck.check(DEVICE, RouteConfig.preset("gkd"), torch.float32, shape=TINY, call=call) is None
    h, w = torch.zeros(3, 4, requires_grad=True), torch.zeros(5, 4)
    assert selfcheck.CallShape.of(h, w, None, torch.zeros(5)) == call
    with torch.no_grad():
        assert not any(selfcheck.CallShape.of(h, w, None, None)[2:5])


def test_the_comparison_reports_a_wrong_gradient():
    """_compare names what differs: a perturbed d weight, NaN per-token values, flipped routes."""
    ref = dict(loss=torch.tensor(1.0), per_token=torch.ones(6), route=torch.zeros(6, dtype=torch.long),
               logprob=-torch.ones(6), grads=[torch.ones(3), torch.ones(4), torch.ones(2)])
    assert selfcheck._compare(ref, ref, 1e-3) is None
    bad = dict(ref, grads=[torch.ones(3), torch.ones(4) * 1.01, torch.ones(2)])
    assert "d weight" in selfcheck._compare(bad, ref, 1e-3)
    bad = dict(ref, per_token=torch.full((6,), float("nan")))
    assert "per_token" in selfcheck._compare(bad, ref, 1e-3)
    bad = dict(ref, route=torch.tensor([0, 1, 0, 1, 0, 0]))
    assert "routes differ" in selfcheck._compare(bad, ref, 1e-3)


def test_a_mismatch_warns_once_and_falls_back_to_torch(fresh):
    calls = []
    fresh.setattr(selfcheck, "check", lambda device, config, dtype, call: calls.append(device) or "loss 1 vs 2")
    config = RouteConfig.preset("dopd")
    with pytest.warns(RuntimeWarning, match=r"disagree with the PyTorch path on cuda:0.*triton .*loss 1 vs 2"):
        assert api._resolve_backend("auto", CUDA0, config, torch.bfloat16) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second check
        assert api._resolve_backend("auto", CUDA0, config, torch.bfloat16) == "torch"
    assert calls == [CUDA0]
    assert api._resolve_backend("triton", CUDA0, config, torch.bfloat16) == "triton"  # explicit choice: no check


def test_a_compile_failure_counts_as_a_mismatch(fresh):
    def broken(*args, **kwargs):
        raise RuntimeError("ptxas fatal")

    import dopd_kernels.triton as tri

    fresh.setattr(tri, "triton_routed_loss", broken)
    problem = selfcheck.check(torch.device("cpu"), RouteConfig.preset("gkd"), torch.float32, shape=TINY)
    assert "raised RuntimeError: ptxas fatal" in problem


def test_agreement_is_cached_per_device(fresh):
    calls = []
    fresh.setattr(selfcheck, "check", lambda device, config, dtype, call: calls.append(device))
    for _ in range(2):
        assert api._resolve_backend("auto", CUDA0, None, torch.float32) == "triton"
        assert api._resolve_backend("auto", torch.device("cuda", 1), None, torch.float32) == "triton"
    assert calls == [CUDA0, torch.device("cuda", 1)]
    assert api._resolve_backend("auto", torch.device("cpu"), None, torch.float32) == "torch"


def test_each_kernel_variant_is_checked_once(fresh):
    """The verdict of a first call under no_grad, fp32, no transform does not vouch for later calls that compile
    other variants (gradients, bf16, a soft-cap, a bias, other route kinds, CE, K); knobs the kernels read at run
    time (route weights, temperature, chunk_size, a multiplier-only transform) reuse it."""
    calls = []
    fresh.setattr(selfcheck, "check", lambda device, config, dtype, call: calls.append((config, dtype, call)))
    dopd = RouteConfig.preset("dopd")
    none = selfcheck.CallShape(grad_hidden=False, grad_weight=False, grad_bias=False)
    capped = (LogitTransform(softcap=30.0), IDENTITY, LogitTransform(softcap=30.0))
    new_variants = [
        (dopd, torch.float32, none),  # the first call: no gradients
        (dopd, torch.float32, selfcheck.CallShape()),  # gradients
        (dopd, torch.bfloat16, selfcheck.CallShape()),  # another dtype
        (dopd, torch.bfloat16, selfcheck.CallShape(transforms=capped)),  # soft-capped student / self
        (dopd, torch.bfloat16, selfcheck.CallShape(teacher_bias=True)),  # a teacher bias
        (RouteConfig.preset("gkd"), torch.bfloat16, selfcheck.CallShape()),  # other route kinds
        (dopd.replace(ce_weight=0.1), torch.bfloat16, selfcheck.CallShape()),  # CE on
        (dopd.replace(top_k=64), torch.bfloat16, selfcheck.CallShape()),  # K: a constexpr of the statistics kernel
    ]
    same_variants = [
        (dopd.replace(beta_light=0.9, temperature=1.5, chunk_size=512, trim=0.1), torch.bfloat16,
         selfcheck.CallShape()),
        (dopd, torch.bfloat16, selfcheck.CallShape(transforms=(LogitTransform(scale=0.5), IDENTITY, IDENTITY))),
        (RouteConfig.preset("gkd", top_k=64), torch.bfloat16, selfcheck.CallShape()),  # no top-K route: K unused
    ]
    for config, dtype, call in new_variants + same_variants + new_variants:
        assert api._resolve_backend("auto", CUDA0, config, dtype, call) == "triton"
    assert calls == new_variants


def test_a_failed_variant_sends_the_whole_device_to_torch(fresh):
    calls = []
    def check(device, config, dtype, call):
        calls.append(dtype)
        return "d weight differs" if dtype == torch.float16 else None

    fresh.setattr(selfcheck, "check", check)
    dopd = RouteConfig.preset("dopd")
    assert api._resolve_backend("auto", CUDA0, dopd, torch.bfloat16) == "triton"
    with pytest.warns(RuntimeWarning, match="d weight differs"):
        assert api._resolve_backend("auto", CUDA0, dopd, torch.float16) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per device
        assert api._resolve_backend("auto", CUDA0, dopd, torch.bfloat16) == "torch"  # vouched for before
        assert api._resolve_backend("auto", CUDA0, dopd, torch.float32) == "torch"  # not checked at all
    assert api._resolve_backend("auto", torch.device("cuda", 1), dopd, torch.bfloat16) == "triton"
    assert calls == [torch.bfloat16, torch.float16, torch.bfloat16]


def _flip_routes(monkeypatch, grad_factor: float = 1.0):
    """The Triton path as it is, except that one valid token's route is flipped (a near-tie) and, when
    ``grad_factor`` != 1, the gradients are scaled by it while the loss value stays (a gradient kernel bug)."""
    import dopd_kernels.triton as tri

    real = tri.triton_routed_loss

    def flipped(*args, **kwargs):
        out = real(*args, **kwargs)
        route = out.route.clone().reshape(-1)
        first = int((route >= 0).nonzero()[0])
        route[first] = (route[first] + 1) % 4
        out.route = route.reshape(out.route.shape)
        out.loss = out.loss + (grad_factor - 1.0) * (out.loss - out.loss.detach())
        return out

    monkeypatch.setattr(tri, "triton_routed_loss", flipped)


@pytest.mark.parametrize("preset", ["dopd", "vanilla_opd_sampled"])
def test_routes_that_differ_still_get_loss_and_gradients_compared(monkeypatch, preset):
    """Near-ties that flip a token's route no longer skip the gradient comparison: it runs on route-insensitive
    tables (one per route kind of the call's) and finds a 1 % gradient error (before: unnoticed)."""
    config = RouteConfig.preset(preset, ce_weight=0.1)
    assert len(selfcheck.route_insensitive_tables(config)) == len({(s.source, s.divergence, s.support)
                                                                  for s in config.routes})
    _flip_routes(monkeypatch, grad_factor=1.01)
    problem = selfcheck.check(DEVICE, config, torch.float32, shape=ROUTED)
    assert problem is not None and "d hidden differs" in problem and "every route" in problem, problem


def test_routes_that_differ_alone_pass(monkeypatch):
    """Flipped routes with right kernels: the route-insensitive comparisons agree, no false alarm."""
    _flip_routes(monkeypatch)
    assert selfcheck.check(DEVICE, RouteConfig.preset("dopd"), torch.float32, shape=ROUTED) is None


def test_the_environment_switch_skips_the_check(fresh):
    fresh.setenv(selfcheck.ENV_VAR, "0")
    fresh.setattr(selfcheck, "check", lambda *a: pytest.fail("the check ran"))
    assert api._resolve_backend("auto", CUDA0, RouteConfig(), torch.float16) == "triton"


def test_no_check_during_a_graph_capture(fresh):
    fresh.setattr(selfcheck, "_capturing", lambda device: True)
    fresh.setattr(selfcheck, "check", lambda *a: pytest.fail("the check ran"))
    assert api._resolve_backend("auto", CUDA0, RouteConfig(), torch.bfloat16) == "triton"
    assert selfcheck._results == {}  # decided later, outside the capture
