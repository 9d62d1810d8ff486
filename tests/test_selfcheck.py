"""backend="auto"'s one-time self-check of the Triton kernels against the PyTorch path (selfcheck.py).

The comparison itself runs for real on the CPU (Triton's interpreter) at a small shape; the CUDA-only
decision logic (warn once, fall back, the environment switch) is driven with a stand-in CUDA device.
"""

import warnings

import pytest
import torch

pytest.importorskip("triton")

from dopd_kernels import RouteConfig, api, selfcheck  # noqa: E402

# The interpreter evaluates masked-out lanes too (log(0) there): numpy RuntimeWarnings, never used values.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
CUDA0 = torch.device("cuda", 0)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TINY = (2, 7, 16, 24, 37, 3)  # sequences, tokens, Hs, Ht, V, teacher padding: quick under the interpreter


@pytest.fixture
def fresh(monkeypatch):
    """No cached verdicts, Triton 'available', no capture, the check enabled."""
    monkeypatch.setattr(selfcheck, "_results", {})
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


def test_the_environment_switch_skips_the_check(fresh):
    fresh.setenv(selfcheck.ENV_VAR, "0")
    fresh.setattr(selfcheck, "check", lambda *a: pytest.fail("the check ran"))
    assert api._resolve_backend("auto", CUDA0, RouteConfig(), torch.float16) == "triton"


def test_no_check_during_a_graph_capture(fresh):
    fresh.setattr(selfcheck, "_capturing", lambda device: True)
    fresh.setattr(selfcheck, "check", lambda *a: pytest.fail("the check ran"))
    assert api._resolve_backend("auto", CUDA0, RouteConfig(), torch.bfloat16) == "triton"
    assert selfcheck._results == {}  # decided later, outside the capture
