"""LogitTransform (multiplier, final soft-cap): validation, -inf handling, and the reference backend
against the loss on logits that were transformed by hand."""

import math

import pytest
import torch

from dopd_kernels import LogitTransform, routed_loss, routed_loss_from_logits
from tests._inputs import make_inputs


@pytest.mark.parametrize("kwargs", [dict(scale=0.0), dict(scale=-1.0), dict(scale=math.inf), dict(scale=math.nan),
                                    dict(scale=True), dict(scale="2"), dict(softcap=0.0), dict(softcap=-3.0),
                                    dict(softcap=math.inf), dict(softcap=True)])
def test_bad_transform_names_the_field(kwargs):
    with pytest.raises(ValueError, match="LogitTransform." + next(iter(kwargs))):
        LogitTransform(**kwargs)


def test_bad_transform_argument_names_the_argument():
    inp = make_inputs()
    for name in ("student_transform", "teacher_transform", "self_transform"):
        with pytest.raises(ValueError, match=name):
            routed_loss(*inp.args(), **inp.kwargs(), backend="reference", **{name: 2.0})


def test_apply_matches_the_formula_and_keeps_minus_inf():
    z = torch.tensor([-math.inf, -40.0, -1.0, 0.0, 3.0, 100.0], dtype=torch.float64)
    tf = LogitTransform(scale=0.5, softcap=30.0)
    want = 30.0 * torch.tanh(0.5 * z / 30.0)
    got = tf.apply(z)
    assert got[0] == -math.inf
    torch.testing.assert_close(got[1:], want[1:], rtol=0, atol=1e-14)
    assert LogitTransform().is_identity and not tf.is_identity
    torch.testing.assert_close(LogitTransform(scale=2.0).apply(z), 2.0 * z)


@pytest.mark.parametrize("preset", ["dopd", "vanilla_opd", "gkd", "opsd", "vanilla_opd_sampled"])
def test_reference_equals_loss_on_transformed_logits(preset):
    inp = make_inputs(vt=41, logit_scale=8.0)
    tf_s, tf_t = LogitTransform(scale=1.7, softcap=5.0), LogitTransform(scale=0.6)
    leaves = inp.fresh_leaves()
    out = routed_loss(leaves[0], leaves[1], inp.teacher_hidden, inp.teacher_weight, inp.self_hidden,
                      inp.target_ids, inp.mask, student_bias=leaves[2], teacher_bias=inp.teacher_bias,
                      config=preset, backend="reference", student_transform=tf_s, teacher_transform=tf_t)
    out.loss.backward()
    h, w, b = inp.fresh_leaves()
    z_s = tf_s.apply(h @ w.T + b)
    z_p = tf_s.apply(inp.self_hidden @ inp.student_weight.T + inp.student_bias)  # self defaults to the student's
    z_t = tf_t.apply(inp.teacher_hidden @ inp.teacher_weight.T + inp.teacher_bias)
    ref = routed_loss_from_logits(z_s, z_t, z_p, inp.target_ids, inp.mask, config=preset)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=1e-12)
    assert torch.equal(out.route, ref.route)
    for got, want in zip(leaves, (h, w, b)):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-12)
    # The transform changes the answer (the test would pass vacuously otherwise).
    plain = routed_loss(*inp.args(), **inp.kwargs(), config=preset, backend="reference")
    assert not torch.allclose(plain.loss, out.loss)
