"""Hypothesis over shapes: T=1, B=1, V not a multiple of the chunk, masked rows, Vt > V, K >= V, Hs != Ht."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dopd_kernels import PRESETS, RouteConfig

from _inputs import assert_outputs_close, make_inputs, run_backend


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 3),
    t=st.integers(1, 6),
    flat=st.booleans(),
    hs=st.integers(1, 9),
    ht=st.integers(1, 9),
    vocab=st.integers(2, 23),
    pad=st.integers(0, 5),
    top_k=st.integers(1, 30),
    chunk=st.integers(1, 8),
    mask_frac=st.sampled_from([0.0, 0.3, 1.0]),
    preset=st.sampled_from(PRESETS),
    seed=st.integers(0, 2**16),
)
def test_torch_path_matches_reference_on_any_shape(b, t, flat, hs, ht, vocab, pad, top_k, chunk, mask_frac, preset, seed):
    lead = (b * t,) if flat else (b, t)
    inp = make_inputs(lead=lead, hs=hs, ht=ht, vocab=vocab, vt=vocab + pad, mask_frac=mask_frac, seed=seed)
    cfg = RouteConfig.preset(preset, top_k=top_k, chunk_size=chunk)
    ref = run_backend(inp, "reference", cfg)
    out = run_backend(inp, "torch", cfg)
    assert_outputs_close(out[0], ref[0], out[1:], ref[1:], 1e-9)
    assert out[0].route.shape == lead
    assert torch.isfinite(out[0].loss)
