"""``routed_loss`` / ``routed_loss_from_logits`` called inside ``torch.autocast``: the loss computes with
autocast disabled for the inputs' device, so the result is bitwise what it is outside (fp32 GEMMs stay fp32,
the inputs keep their dtypes). Before: the PyTorch path raised (``torch.topk(out=fp32)`` given a bf16 chunk)
and its GEMMs would have run in bf16."""

import pytest
import torch

from dopd_kernels import RouteConfig, routed_loss_from_logits

from _inputs import make_inputs, run_backend


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("preset", ["dopd", "vanilla_opd"])
def test_cpu_autocast_changes_nothing(backend, preset):
    inp = make_inputs(dtype=torch.float32, vt=40, logit_scale=3.0, lead=(4, 16), hs=64, ht=64, vocab=37,
                      hard_labels=True)
    cfg = RouteConfig.preset(preset, top_k=8, ce_weight=0.1)
    plain = run_backend(inp, backend, cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")
        inside = run_backend(inp, backend, cfg)
        logprob = inside[0].student_logprob  # the lazy pass too, read inside the region
    assert torch.equal(inside[0].loss, plain[0].loss) and inside[0].loss.dtype == plain[0].loss.dtype
    for got, want in zip(inside[1:], plain[1:]):
        assert torch.equal(got, want)
    for name in ("per_token_loss", "route", "q_self", "q_teacher"):
        assert torch.equal(getattr(inside[0], name), getattr(plain[0], name)), name
    assert torch.equal(logprob, plain[0].student_logprob)


def test_cpu_autocast_from_logits():
    """(Passed before the fix too: CPU autocast casts none of the ops this path runs; kept for the contract.)"""
    inp = make_inputs(dtype=torch.float32, lead=(3, 9))
    zs = inp.student_hidden @ inp.student_weight.T + inp.student_bias
    zt = inp.teacher_hidden @ inp.teacher_weight.T + inp.teacher_bias
    zp = inp.self_hidden @ inp.student_weight.T + inp.student_bias
    outs = []
    for autocast in (False, True):
        leaf = zs.detach().clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = routed_loss_from_logits(student_logits=leaf, teacher_logits=zt, self_logits=zp,  # by keyword
                                          target_ids=inp.target_ids, mask=inp.mask, config=RouteConfig(top_k=6))
            out.loss.backward()
        outs.append((out.loss.detach(), leaf.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
