"""Compiled Triton kernels on CUDA at a medium shape (skipped without a GPU): triton vs the torch path.

Shape: N = 4 x 300 tokens, Hs = 192, Ht = 320, V = 5003 (not a multiple of any tile), Vt = V + 61,
fp32, bf16 and fp16, every preset, the CE term on the sampled / top-K presets. Exercises the GPU tile
sizes, the vocabulary splits of the statistics kernel, several full-support chunks and the device-side
row counts; soft-capped models (backend="triton" and "auto"); then the self-check of backend="auto",
tensors on a non-current GPU (>= 2 GPUs), a CUDA graph capture after a warm-up (replayed after the
route-table cache was churned) and fp16 gradients that only an fp32 hold survives.
"""

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from dopd_kernels import PRESETS, LogitTransform, RouteConfig, routed_loss  # noqa: E402


def _inputs(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    n, hs, ht, v = (4, 300), 192, 320, 5003
    h = torch.randn(*n, hs, device="cuda", generator=g)
    t = {
        "student_hidden": h, "self_hidden": h + 0.3 * torch.randn(*n, hs, device="cuda", generator=g),
        "teacher_hidden": torch.randn(*n, ht, device="cuda", generator=g),
        "student_weight": torch.randn(v, hs, device="cuda", generator=g) * 3 / hs**0.5,
        "teacher_weight": torch.randn(v + 61, ht, device="cuda", generator=g) * 4 / ht**0.5,
    }
    t = {k: x.to(dtype) for k, x in t.items()}
    mask = torch.rand(*n, device="cuda", generator=g) > 0.1
    target = torch.randint(0, v, n, device="cuda", generator=g)
    return t, target, mask


def _run(backend, t, target, mask, config, **transforms):
    sh = t["student_hidden"].clone().requires_grad_()
    sw = t["student_weight"].clone().requires_grad_()
    labels = torch.where(mask, target, 0) if config.ce_weight > 0 else None
    out = routed_loss(sh, sw, t["teacher_hidden"], t["teacher_weight"], t["self_hidden"], target, mask,
                      hard_labels=labels, config=config, backend=backend, **transforms)
    out.loss.backward()
    return out, sh.grad.float(), sw.grad.float()


def _rel(x, ref):
    x, ref = x.double(), ref.double()
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("preset,ce", [(p, 0.0) for p in PRESETS]
                         + [("vanilla_opd_sampled", 0.1), ("opsd", 0.1), ("dopd", 0.1)])
def test_triton_matches_torch_on_cuda(preset, ce, dtype):
    t, target, mask = _inputs(dtype)
    config = RouteConfig.preset(preset, chunk_size=512, ce_weight=ce)
    ref, ref_dh, ref_dw = _run("torch", t, target, mask, config)
    tri, tri_dh, tri_dw = _run("triton", t, target, mask, config)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    agree = (tri.route == ref.route).float().mean().item()
    assert agree > (0.999 if dtype == torch.float32 else 0.98)  # bf16 / fp16: near-ties may flip a route
    if agree == 1.0:
        assert _rel(tri.loss, ref.loss) < tol
        assert _rel(tri.per_token_loss, ref.per_token_loss) < tol
        assert _rel(tri_dh, ref_dh) < tol and _rel(tri_dw, ref_dw) < tol
    assert _rel(tri.student_logprob, ref.student_logprob) < tol
    assert torch.isfinite(tri.loss)


@pytest.mark.parametrize("k", [128, 37])
def test_stats_topk_many_cuts_on_cuda(k):
    """One split over V = 20011 at the GPU tile sizes: the candidate list is cut many times (CAP = 512)."""
    from dopd_kernels.triton.stats import fused_linear_stats

    g = torch.Generator(device="cuda").manual_seed(1)
    n, h, v = 300, 96, 20011
    hidden = torch.randn(n, h, device="cuda", generator=g)
    weight = torch.randn(v, h, device="cuda", generator=g) / h**0.5
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    st = fused_linear_stats(hidden, weight, None, y, vocab=v, inv_tau=1.0, top_k=k, n_splits=1)
    z = hidden.double() @ weight.double().T
    vals = z.topk(k, dim=1).values
    torch.testing.assert_close(st.topk_vals.double(), vals, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z.gather(1, st.topk_idx), st.topk_vals.double(), rtol=1e-5, atol=1e-5)
    assert (st.topk_idx.sort(1).values.diff(dim=1) > 0).all()  # k distinct ids per row


def test_stats_topk_ties_and_settled_rows_repeat_on_cuda():
    """Integer logits (ties: the id half of the cut) in a block mixing rows that settle early (falling
    logits) with noisy rows that force cuts, repeated: a missing barrier in the in-place cut would show
    up as a wrong or duplicated id in some run."""
    import numpy as np

    from dopd_kernels.triton.stats import fused_linear_stats

    g = torch.Generator().manual_seed(2)
    n, h, v, k = 256, 32, 9001, 128
    hidden = torch.ones(n, h)
    hidden[::2, 0] = 0.0
    hidden[1::2, 1:] = 0.0
    weight = torch.randint(-3, 4, (v, h), generator=g).float()
    weight[:, 0] = -torch.arange(v, dtype=torch.float32)
    z = hidden.double() @ weight.double().T
    order = np.lexsort((np.broadcast_to(np.arange(v), (n, v)), -z.numpy()), axis=1)[:, :k]
    expect = torch.from_numpy(order).cuda()
    hidden, weight = hidden.cuda(), weight.cuda()
    y = torch.zeros(n, dtype=torch.long, device="cuda")
    for _ in range(20):
        st = fused_linear_stats(hidden, weight, None, y, vocab=v, inv_tau=1.0, top_k=k, n_splits=1)
        assert torch.equal(st.topk_idx, expect)


#: Gemma-2-like soft-caps the logits reach (|logit| up to ~10 here), a Cohere-like multiplier on the teacher.
SOFTCAPS = dict(student_transform=LogitTransform(scale=1.3, softcap=4.0),
                teacher_transform=LogitTransform(scale=0.7, softcap=5.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("preset,ce", [("dopd", 0.1), ("vanilla_opd", 0.0), ("vanilla_opd_sampled", 0.1)])
def test_softcap_matches_torch_on_cuda(preset, ce, dtype):
    """The soft-capped kernel variants (statistics, logit GEMMs, rows kernel, gather) against the torch path."""
    t, target, mask = _inputs(dtype)
    config = RouteConfig.preset(preset, chunk_size=512, ce_weight=ce)
    ref, ref_dh, ref_dw = _run("torch", t, target, mask, config, **SOFTCAPS)
    tri, tri_dh, tri_dw = _run("triton", t, target, mask, config, **SOFTCAPS)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    agree = (tri.route == ref.route).float().mean().item()
    assert agree > (0.999 if dtype == torch.float32 else 0.98)
    if agree == 1.0:
        assert _rel(tri.loss, ref.loss) < tol
        assert _rel(tri.per_token_loss, ref.per_token_loss) < tol
        assert _rel(tri_dh, ref_dh) < tol and _rel(tri_dw, ref_dw) < tol
    assert _rel(tri.student_logprob, ref.student_logprob) < tol
    assert torch.isfinite(tri.loss)


def test_auto_with_softcaps_uses_triton_on_cuda(monkeypatch):
    """backend="auto" with transforms: its self-check (run with the call's transforms) passes, so the call runs
    the Triton path, which agrees with the torch path."""
    import warnings

    from dopd_kernels import selfcheck

    monkeypatch.setattr(selfcheck, "_results", {})
    monkeypatch.delenv(selfcheck.ENV_VAR, raising=False)
    t, target, mask = _inputs(torch.bfloat16)
    config = RouteConfig.preset("dopd", chunk_size=512)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        auto = _run("auto", t, target, mask, config, **SOFTCAPS)
    device = torch.device("cuda", torch.cuda.current_device())
    assert selfcheck._results == {(device.type, device.index): True}
    tri = _run("triton", t, target, mask, config, **SOFTCAPS)
    assert torch.equal(auto[0].route, tri[0].route) and _rel(auto[0].loss, tri[0].loss) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("preset", ["dopd", "vanilla_opd_sampled", "gkd"])
def test_selfcheck_passes_on_this_gpu(preset, dtype):
    """backend="auto"'s one-time comparison finds nothing on this GPU (else auto would fall back to torch)."""
    from dopd_kernels import selfcheck

    assert selfcheck.check(torch.device("cuda"), RouteConfig.preset(preset), dtype) is None


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_a_non_current_gpu():
    """Tensors on cuda:1 while cuda:0 is current: the launches run on cuda:1 and the current device stays."""
    t, target, mask = _inputs(torch.bfloat16)
    config = RouteConfig.preset("dopd", chunk_size=512)
    ref, ref_dh, ref_dw = _run("torch", t, target, mask, config)
    moved = {k: v.to("cuda:1") for k, v in t.items()}
    torch.cuda.set_device(0)
    tri, dh, dw = _run("triton", moved, target.to("cuda:1"), mask.to("cuda:1"), config)
    assert torch.cuda.current_device() == 0
    assert tri.loss.device == torch.device("cuda", 1) and dw.device == torch.device("cuda", 1)
    assert (tri.route.cpu() == ref.route.cpu()).float().mean() > 0.98
    assert _rel(tri.student_logprob.cpu(), ref.student_logprob.cpu()) < 3e-2
    if torch.equal(tri.route.cpu(), ref.route.cpu()):
        assert _rel(dw.cpu(), ref_dw.cpu()) < 3e-2 and _rel(dh.cpu(), ref_dh.cpu()) < 3e-2


def test_cuda_graph_capture_after_a_warm_up():
    """One eager call (the warm-up: compiles the kernels, copies the route tables), then forward and backward
    captured in a CUDA graph; replays match the eager step, also after the route-table cache was churned
    past its size (the captured tables are pinned) and the caching allocator emptied."""
    from dopd_kernels.triton import tables

    t, target, mask = _inputs(torch.bfloat16)
    config = RouteConfig.preset("dopd", chunk_size=512, check_values=False)
    sh = t["student_hidden"].clone().requires_grad_()
    sw = t["student_weight"].clone().requires_grad_()

    def step():
        out = routed_loss(sh, sw, t["teacher_hidden"], t["teacher_weight"], t["self_hidden"], target, mask,
                          config=config, backend="triton")
        out.loss.backward()
        return out.loss.detach()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = step()
    torch.cuda.current_stream().wait_stream(side)
    eager_dw = sw.grad.clone()
    sh.grad = sw.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    for churn in (False, True):
        if churn:
            for i in range(tables.CACHE_SIZE + 5):
                tables.route_tables(RouteConfig.preset("dopd", beta_weak=1.0 + i), sw.device)
            torch.cuda.empty_cache()
        graph.replay()
        torch.cuda.synchronize()
        assert _rel(static_loss, eager) < 1e-5
        assert _rel(sw.grad.float(), eager_dw.float()) < 1e-5


def test_fp16_gradients_survive_the_loss_scale_on_cuda():
    """fp16 inputs at a temperature that puts every d W entry below fp16's normal range before a 2^16 loss
    scale: the fp32 hold keeps them (the float64 reference on the PyTorch path agrees within fp16 rounding)."""
    g = torch.Generator(device="cuda").manual_seed(3)
    n, hs, ht, v = (4, 300), 192, 320, 5003
    h = torch.randn(*n, hs, device="cuda", generator=g)
    t = {"student_hidden": h, "self_hidden": h + 0.3 * torch.randn(*n, hs, device="cuda", generator=g),
         "teacher_hidden": torch.randn(*n, ht, device="cuda", generator=g),
         "student_weight": torch.randn(v, hs, device="cuda", generator=g) * 3000 / hs**0.5,
         "teacher_weight": torch.randn(v, ht, device="cuda", generator=g) * 4000 / ht**0.5}
    target = torch.randint(0, v, n, device="cuda", generator=g)
    config = RouteConfig.preset("vanilla_opd", temperature=1000.0, chunk_size=512)
    grads = {}
    for backend, dtype in (("triton", torch.float16), ("torch", torch.float64)):
        x = {k: u.half().to(dtype) for k, u in t.items()}
        sw = x["student_weight"].requires_grad_()
        out = routed_loss(x["student_hidden"], sw, x["teacher_hidden"], x["teacher_weight"], x["self_hidden"],
                          target, config=config, backend=backend)
        (out.loss * 2.0**16).backward()
        grads[backend] = sw.grad
    assert grads["torch"].abs().max() * 2.0**-16 < 6.1e-5
    assert _rel(grads["triton"].float(), grads["torch"]) < 1e-2
