"""bf16 heads on the PyTorch path: converted per vocabulary block, exact against fp32 on the same values.

bf16 -> fp32 conversion is exact, so the bf16 path must compute what the fp32 path computes on the
upcast inputs, up to fp32 summation order (1e-5); only the returned gradients are rounded to bf16.
Small conversion blocks (a few vocabulary rows, a ragged last one) exercise the block loop.
"""

import pytest
import torch

import dopd_kernels.chunked_stats as chunked_stats
from dopd_kernels import RouteConfig, routed_loss

from _inputs import make_inputs


def _run(inp, dtype, config, self_weight=None, hard_labels=None):
    """routed_loss (torch path) on ``inp`` cast to ``dtype``; returns (output, grads of h, W, b)."""
    h = inp.student_hidden.detach().to(dtype).requires_grad_()
    w = inp.student_weight.detach().to(dtype).requires_grad_()
    b = inp.student_bias.detach().to(dtype).requires_grad_()
    out = routed_loss(h, w, inp.teacher_hidden.to(dtype), inp.teacher_weight.to(dtype), inp.self_hidden.to(dtype),
                      inp.target_ids, inp.mask, student_bias=b, teacher_bias=inp.teacher_bias.to(dtype),
                      self_weight=None if self_weight is None else self_weight.to(dtype), hard_labels=hard_labels,
                      config=config, backend="torch")
    out.loss.backward()
    return out, (h.grad, w.grad, b.grad)


@pytest.mark.parametrize("preset", ["dopd", "gkd", "vanilla_opd_sampled"])
@pytest.mark.parametrize("rows_per_block", [3, 1000])
def test_bf16_heads_equal_fp32_on_the_same_values(monkeypatch, preset, rows_per_block):
    inp = make_inputs(dtype=torch.bfloat16, vt=43, hs=12, ht=20)
    # 3 rows per block: 13 student blocks (V=37, the last one ragged), 15 teacher blocks; 1000: one block.
    monkeypatch.setattr(chunked_stats, "CONVERT_BLOCK_ELEMENTS", rows_per_block * 20)
    kw = {}
    if preset == "dopd":  # a separate (frozen) self head, converted on its own
        kw["self_weight"] = inp.student_weight * 0.9
    if preset == "gkd":  # every row takes the full-softmax path, plus a CE term
        kw["hard_labels"] = inp.target_ids.clamp(min=0)
    config = RouteConfig.preset(preset, top_k=5, chunk_size=4, ce_weight=0.3 if preset == "gkd" else 0.0)
    got, got_grads = _run(inp, torch.bfloat16, config, **kw)
    want, want_grads = _run(inp, torch.float32, config, **kw)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    for name in ("per_token_loss", "q_self", "q_teacher", "adv_gap", "student_logprob"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-6, msg=name)
    assert torch.equal(got.route, want.route)
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == torch.bfloat16
        # The fp32 gradient rounded once to bf16 (relative 2^-8), with fp32 summation-order noise.
        torch.testing.assert_close(g.float(), w.to(torch.bfloat16).float(), rtol=2 ** -7, atol=1e-6)


def test_vocab_blocks_convert_a_block_at_a_time(monkeypatch):
    monkeypatch.setattr(chunked_stats, "CONVERT_BLOCK_ELEMENTS", 40)
    w = torch.randn(11, 8).to(torch.bfloat16)
    seen = [(start, block.shape[0], block.dtype, torch.equal(block, w[start: start + block.shape[0]].float()),
             block.data_ptr()) for start, block in chunked_stats.vocab_blocks(w, torch.float32)]
    assert [s[:4] for s in seen] == [(0, 5, torch.float32, True), (5, 5, torch.float32, True),
                                     (10, 1, torch.float32, True)]
    assert len({s[4] for s in seen}) == 1  # one buffer, reused: no allocation per block
    w32 = w.float()
    same = list(chunked_stats.vocab_blocks(w32, torch.float32))
    assert len(same) == 1 and same[0][1] is w32  # already in the compute dtype: no copy
