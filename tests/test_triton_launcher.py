"""The Triton launcher's bookkeeping: empty chunks do no work, route tables under CUDA graph capture, the
launch device, the interpreter fix for Triton < 3.9.

Work is counted under the interpreter by wrapping its memory operations (every masked-in load, store and
atomic of every program) and tallying the addresses that fall inside given tensors.
"""

import contextlib
import os

import pytest
import torch

pytest.importorskip("triton")

from dopd_kernels import RouteConfig  # noqa: E402
from dopd_kernels.triton import interpreter_compat, tables  # noqa: E402
from dopd_kernels.triton.blocks import blocks_for  # noqa: E402
from dopd_kernels.triton.full_support import KIND_JSD, Model, student_full_rows  # noqa: E402
from dopd_kernels.devices import device_guard  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="counts the interpreter's accesses")


@contextlib.contextmanager
def count_accesses(**tensors):
    """Yields {name: elements loaded, stored or atomically updated inside that tensor} over the block."""
    from triton.runtime.interpreter import InterpreterBuilder

    spans = {k: (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for k, t in tensors.items()}
    counts = dict.fromkeys(tensors, 0)

    def tally(ptrs, mask):
        addr = ptrs.data.reshape(-1)
        if mask is not None:
            addr = addr[mask.data.reshape(-1).astype(bool)]
        for name, (lo, hi) in spans.items():
            counts[name] += int(((addr >= lo) & (addr < hi)).sum())

    load, store, rmw = (InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store,
                        InterpreterBuilder.create_atomic_rmw)

    def counted_load(self, ptrs, mask, *args, **kwargs):
        tally(ptrs, mask)
        return load(self, ptrs, mask, *args, **kwargs)

    def counted_store(self, ptrs, value, mask, *args, **kwargs):
        tally(ptrs, mask)
        return store(self, ptrs, value, mask, *args, **kwargs)

    def counted_rmw(self, op, ptr, val, mask, *args, **kwargs):
        tally(ptr, mask)
        return rmw(self, op, ptr, val, mask, *args, **kwargs)

    InterpreterBuilder.create_masked_load = counted_load
    InterpreterBuilder.create_masked_store = counted_store
    InterpreterBuilder.create_atomic_rmw = counted_rmw
    try:
        yield counts
    finally:
        InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store = load, store
        InterpreterBuilder.create_atomic_rmw = rmw


def _full_rows_problem(n, dtype=torch.float32, seed=0, n_max=48):
    """Inputs of student_full_rows for n rows (JS against the teacher, CE on, biases), fresh accumulators;
    the first n rows of one n_max-row problem, so that problems of different n agree on their common rows."""
    g = torch.Generator().manual_seed(seed)
    hs, ht, vocab = 20, 24, 37
    student = Model(torch.randn(n_max, hs, generator=g)[:n].to(dtype), torch.randn(vocab, hs, generator=g).to(dtype),
                    torch.randn(vocab, generator=g).to(dtype))
    teacher = Model(torch.randn(n_max, ht, generator=g)[:n].to(dtype), torch.randn(vocab, ht, generator=g).to(dtype),
                    None)
    lse_t = (teacher.hidden.double() @ teacher.weight.double().T).logsumexp(-1).float()
    y = torch.randint(0, vocab, (n_max,), generator=g)[:n]
    per_row = dict(y=y, yh=y, kind=torch.full((n,), KIND_JSD, dtype=torch.int32), rw=torch.ones(n),
                   use_t=torch.ones(n, dtype=torch.int32), lse_t=lse_t, lse_p=torch.zeros(n), lsrc=torch.zeros(n),
                   red=torch.full((n,), 1.0 / 16))
    grads = {"hidden": torch.randn(n_max, hs, generator=g)[:n].clone(), "weight": torch.randn(vocab, hs, generator=g),
             "bias": torch.randn(vocab, generator=g)}
    return student, teacher, per_row, grads, vocab


def _run_full_rows(n, live, chunk, dtype=torch.float32):
    student, teacher, per_row, grads, vocab = _full_rows_problem(n, dtype)
    before = {k: v.clone() for k, v in grads.items()}
    per_token, slp = torch.zeros(n), torch.full((n,), float("nan"))
    count = torch.tensor([live], dtype=torch.int32)
    with count_accesses(d_weight=grads["weight"], d_bias=grads["bias"], d_hidden=grads["hidden"],
                        per_token=per_token, hidden=student.hidden, weight=student.weight) as counts:
        student_full_rows(order=torch.arange(n), count=count, student=student, teacher=teacher, self_model=None,
                          per_row=per_row, vocab=vocab, inv_tau=1.0, jsd_beta=0.5, ce_weight=0.2,
                          flags={"rkl": False, "fkl": False, "jsd": True, "sampled": False}, chunk=chunk,
                          blocks=blocks_for(torch.device("cpu")), per_token=per_token, student_logprob=slp,
                          grads=grads)
    return counts, grads, before, per_token


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_chunks_without_live_rows_do_no_work(dtype):
    """Every chunk past the device-side count launches (no host sync) but its programs return at once: with
    no live row at all, not one element of d W, d b, d h, the per-token losses or the inputs is read or
    written, and d W / d b are bitwise what they were (fp16: also the power-of-two scale slots)."""
    counts, grads, before, _ = _run_full_rows(n=40, live=0, chunk=16, dtype=dtype)
    assert counts == dict.fromkeys(counts, 0)
    for name in ("weight", "bias", "hidden"):
        assert torch.equal(grads[name], before[name]), name


@interpreted
def test_empty_chunks_after_a_live_one_add_nothing():
    """16 live rows in a 48-row problem of 16-row chunks (two empty chunks) against the 16-row problem:
    the same accesses to d W and d b, element for element, and bitwise the same accumulators."""
    small, small_grads, _, small_loss = _run_full_rows(n=16, live=16, chunk=16)
    large, large_grads, _, large_loss = _run_full_rows(n=48, live=16, chunk=16)
    assert small["d_weight"] > 0 and large["d_weight"] == small["d_weight"]
    assert large["d_bias"] == small["d_bias"]
    for name in ("weight", "bias"):
        assert torch.equal(large_grads[name], small_grads[name]), name
    assert torch.equal(large_loss[:16], small_loss)


def test_route_table_eviction_spares_tables_read_during_a_capture(monkeypatch):
    """A table read during a CUDA graph capture is pinned: filling the cache past CACHE_SIZE evicts the
    others but returns that very table object (a captured graph keeps reading its memory)."""
    monkeypatch.setattr(tables, "_cache", type(tables._cache)())
    monkeypatch.setattr(tables, "_pinned", {})
    cpu = torch.device("cpu")
    captured = RouteConfig.preset("gkd")
    first = tables.route_tables(captured, cpu)  # the warm-up call, outside the capture
    monkeypatch.setattr(tables, "_capturing", lambda device: True)
    assert tables.route_tables(captured, cpu) is first
    monkeypatch.setattr(tables, "_capturing", lambda device: False)
    other = RouteConfig.preset("dopd")
    evicted = tables.route_tables(other, cpu)
    for i in range(tables.CACHE_SIZE + 3):
        tables.route_tables(RouteConfig.preset("dopd", beta_weak=1.0 + i), cpu)
    assert tables.route_tables(captured, cpu) is first
    assert tables.route_tables(other, cpu) is not evicted  # an unpinned table was evicted and rebuilt
    assert len(tables._cache) <= tables.CACHE_SIZE


def test_route_tables_key_ignores_fields_they_do_not_hold(monkeypatch):
    monkeypatch.setattr(tables, "_cache", type(tables._cache)())
    cpu = torch.device("cpu")
    a = tables.route_tables(RouteConfig.preset("dopd"), cpu)
    assert tables.route_tables(RouteConfig.preset("dopd", chunk_size=7, trim=0.2), cpu) is a
    assert tables.route_tables(RouteConfig.preset("dopd", beta_light=0.5), cpu) is not a


def test_a_capture_without_warm_up_raises_a_clear_error(monkeypatch):
    monkeypatch.setattr(tables, "_cache", type(tables._cache)())
    monkeypatch.setattr(tables, "_capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="warm-up"):
        tables.route_tables(RouteConfig.preset("sdpo"), torch.device("cpu"))


def test_launches_run_under_the_tensors_device():
    """Triton launches on the current CUDA device: the path enters the tensors' device (cuda:1 while cuda:0
    is current), and does nothing off CUDA."""
    guard = device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(device_guard(torch.device("cpu")), contextlib.nullcontext)


@interpreted
@pytest.mark.parametrize("with_bias", [True, False])
def test_vocab_parallel_topk_kernels_touch_owned_ids_only(with_bias):
    """The gather / scatter kernels with skip_negative (vocabulary-parallel: ids < 0 are other ranks'): those
    pairs load no weight row and add no atomics (before: clamped to local row 0, their loads and zero atomics
    went to W[0] / d W[0], ~(ranks - 1) / ranks of N K Hs); the owned pairs' values and gradients as dense torch."""
    from dopd_kernels.triton.topk import gather_logits, scatter_grad

    g = torch.Generator().manual_seed(3)
    n, k, hidden, vocab = 6, 5, 20, 11
    h, w = torch.randn(n, hidden, generator=g), torch.randn(vocab, hidden, generator=g)
    b = torch.randn(vocab, generator=g) if with_bias else None
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(n)])
    owned = torch.rand(n, k, generator=g) < 0.4
    masked = torch.where(owned, ids, -1)
    on, blocks = torch.ones(n, dtype=torch.bool), blocks_for(torch.device("cpu"))
    dz = torch.randn(n, k, generator=g)
    grads = {"hidden": torch.zeros(n, hidden), "weight": torch.zeros(vocab, hidden),
             "bias": torch.zeros(vocab) if with_bias else None}
    tensors = dict(weight=w, d_weight=grads["weight"]) | (dict(bias=b, d_bias=grads["bias"]) if with_bias else {})
    with count_accesses(**tensors) as counts:
        z = gather_logits(h, w, b, masked, on, 1.0, blocks, skip_negative=True)
        scatter_grad(dz, h, w, masked, on, grads, blocks, skip_negative=True)
    pairs = int(owned.sum())
    assert 0 < pairs < n * k
    expect = dict(weight=2 * pairs * hidden, d_weight=pairs * hidden) | (dict(bias=pairs, d_bias=pairs) if with_bias
                                                                          else {})
    assert counts == expect  # gather + scatter each read an owned row once; one atomic per owned element
    wd = w.double()
    dense_z = torch.einsum("nkh,nh->nk", wd[ids], h.double()) + (0.0 if b is None else b.double()[ids])
    torch.testing.assert_close(z.double(), torch.where(owned, dense_z, 0.0), rtol=1e-5, atol=1e-5)
    dense = torch.zeros(n, vocab, dtype=torch.float64).scatter_(1, ids, torch.where(owned, dz, 0.0).double())
    torch.testing.assert_close(grads["hidden"].double(), dense @ wd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads["weight"].double(), dense.T @ h.double(), rtol=1e-5, atol=1e-5)
    if with_bias:
        torch.testing.assert_close(grads["bias"].double(), dense.sum(0), rtol=1e-5, atol=1e-5)


@interpreted
def test_every_launch_of_the_single_process_path_is_guarded():
    """Every kernel launch (statistics, GEMMs, rows, gather / scatter, the lazy statistics pass) runs inside a
    guard of its tensors' device; the vocabulary-parallel path: tests/test_vocab_parallel.py."""
    from dopd_kernels import routed_loss

    from _inputs import make_inputs
    from _launch_guard import record_launch_guards, unguarded

    inp = make_inputs(lead=(2, 5), dtype=torch.float32, hard_labels=True)
    h = inp.student_hidden.clone().requires_grad_()
    with record_launch_guards() as launches:
        out = routed_loss(h, *inp.args()[1:], student_bias=inp.student_bias, teacher_bias=inp.teacher_bias,
                          hard_labels=inp.hard_labels, config=RouteConfig.preset("dopd", top_k=8, ce_weight=0.1),
                          backend="triton")
        out.loss.backward()
        out.student_logprob
    names = {name for name, _, _ in launches}
    assert {"_stats_kernel", "_rows_kernel", "_gather_logits_kernel", "_scatter_grad_kernel"} <= names, names
    assert not unguarded(launches)


def test_interpreter_fix_is_for_old_triton_only():
    import triton

    assert interpreter_compat._version("3.6.0") == (3, 6)
    assert interpreter_compat._version("3.10.1+git") == (3, 10)
    installed = interpreter_compat._version(triton.__version__)
    assert interpreter_compat.apply() == (installed < (3, 9))
