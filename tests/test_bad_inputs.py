"""Bad input gets a ValueError that names the argument."""

import pytest
import torch

from dopd_kernels import RouteConfig, RouteSpec, routed_loss, routed_loss_from_logits

from _inputs import make_inputs


def _call(**changes):
    inp = make_inputs(lead=(2, 4), hs=6, ht=8, vocab=11, vt=13, mask_frac=0.0)
    args = dict(student_hidden=inp.student_hidden, student_weight=inp.student_weight, teacher_hidden=inp.teacher_hidden,
                teacher_weight=inp.teacher_weight, self_hidden=inp.self_hidden, target_ids=inp.target_ids, mask=None)
    args.update(changes)
    kw = {k: args.pop(k) for k in list(args) if k not in
          ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight", "self_hidden", "target_ids", "mask")}
    return routed_loss(args["student_hidden"], args["student_weight"], args["teacher_hidden"], args["teacher_weight"],
                       args["self_hidden"], args["target_ids"], args["mask"], **kw)


F64 = torch.float64


@pytest.mark.parametrize(
    "changes,name",
    [
        (dict(student_hidden=torch.randn(2, 4, 5, dtype=F64)), "student_hidden"),
        (dict(student_hidden=torch.randn(8, dtype=F64)), "student_hidden"),
        (dict(self_hidden=torch.randn(2, 5, 6, dtype=F64)), "self_hidden"),
        (dict(teacher_hidden=torch.randn(2, 4, 7, dtype=F64)), "teacher_hidden"),
        (dict(teacher_hidden=torch.randn(3, 4, 8, dtype=F64)), "teacher_hidden"),
        (dict(teacher_weight=torch.randn(10, 8, dtype=F64)), "teacher_weight"),  # Vt < V
        (dict(student_weight=torch.randn(11, 6, dtype=torch.float32)), "student_weight"),  # dtype mismatch
        (dict(self_hidden=torch.randn(2, 4, 6, dtype=torch.float32)), "self_hidden"),
        (dict(student_hidden=torch.ones(2, 4, 6, dtype=torch.int64)), "student_hidden"),
        (dict(target_ids=torch.zeros(2, 5, dtype=torch.int64)), "target_ids"),
        (dict(target_ids=torch.zeros(2, 4)), "target_ids"),
        (dict(target_ids=torch.full((2, 4), 11)), "target_ids"),
        (dict(target_ids=torch.full((2, 4), -1)), "target_ids"),
        (dict(mask=torch.ones(2, 3, dtype=torch.bool)), "mask"),
        (dict(mask=torch.full((2, 4), 2)), "mask"),
        (dict(student_bias=torch.zeros(10, dtype=F64)), "student_bias"),
        (dict(teacher_bias=torch.zeros(11, dtype=F64)), "teacher_bias"),
        (dict(self_weight=torch.zeros(11, 5, dtype=F64)), "self_weight"),
        (dict(self_bias=torch.zeros(11, dtype=F64)), "self_bias"),
        (dict(config=RouteConfig(ce_weight=0.5)), "hard_labels"),
        (dict(hard_labels=torch.full((2, 4), 99)), "hard_labels"),
        (dict(config=3), "config"),
        (dict(config="no_such_preset"), "preset"),
        (dict(backend="cuda"), "backend"),
        (dict(student_hidden=torch.full((2, 4, 6), float("nan"), dtype=F64)), "student_hidden"),
        (dict(teacher_hidden=torch.full((2, 4, 8), float("inf"), dtype=F64)), "teacher_hidden"),
        (dict(self_hidden=torch.full((2, 4, 6), float("-inf"), dtype=F64)), "self_hidden"),
        (dict(student_hidden=[[0.0]]), "student_hidden"),
        (dict(student_bias=torch.full((11,), float("nan"), dtype=F64)), "student_bias"),
        (dict(teacher_bias=torch.full((13,), float("inf"), dtype=F64)), "teacher_bias"),
        (dict(student_transform=30.0), "student_transform"),  # a bare cap, not a LogitTransform
        (dict(teacher_transform={"softcap": 30.0}), "teacher_transform"),
        (dict(self_transform=(1.0, 30.0)), "self_transform"),
    ],
)
def test_bad_argument_is_named(changes, name):
    with pytest.raises(ValueError, match=name):
        _call(**changes)


def test_masked_positions_may_hold_anything():
    inp = make_inputs(lead=(2, 4), mask_frac=0.0)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 2:] = False
    ids = inp.target_ids.clone()
    ids[1, 2:] = -100
    hidden = inp.student_hidden.clone()
    hidden[1, 3] = float("nan")  # e.g. a fully masked attention row
    out = routed_loss(hidden, inp.student_weight, inp.teacher_hidden, inp.teacher_weight, inp.self_hidden, ids, mask)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_one_non_finite_hidden_value_at_a_valid_position_is_named(bad):
    inp = make_inputs(lead=(2, 4), mask_frac=0.0)
    hidden = inp.self_hidden.clone()
    hidden[1, 2, 3] = bad  # a single entry of an otherwise finite row
    with pytest.raises(ValueError, match="self_hidden has non-finite"):
        routed_loss(inp.student_hidden, inp.student_weight, inp.teacher_hidden, inp.teacher_weight, hidden,
                    inp.target_ids)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(top_k=0), "top_k"),
        (dict(trim=1.0), "trim"),
        (dict(trim=-0.1), "trim"),
        (dict(normalize="l2"), "normalize"),
        (dict(reduction="mean"), "reduction"),
        (dict(temperature=0.0), "temperature"),
        (dict(jsd_beta=1.0), "jsd_beta"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(ce_weight=-1.0), "ce_weight"),
        (dict(routes=[("teacher", "rkl", "topk")] * 3), "routes"),
        (dict(routes={"LH": ("teacher", "rkl", "topk"), "XX": ("self", "rkl", "topk")}), "routes"),
        (dict(routes=[("master", "rkl", "topk")] * 4), "source"),
        (dict(routes=[("teacher", "tv", "topk")] * 4), "divergence"),
        (dict(routes=[("teacher", "rkl", "everything")] * 4), "support"),
        (dict(routes=[("teacher", "jsd", "sampled")] * 4), "sampled"),
        (dict(routes=[{"source": "self", "divergence": "rkl", "support": "full", "colour": 1}] * 4), "colour"),
        (dict(routes=[("self", "rkl", "full", "beta_heavy")] * 4), "weight"),
        (dict(routes=[("self", "rkl", "full", -1.0)] * 4), "weight"),
    ],
)
def test_bad_config_is_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        RouteConfig(**kwargs)


def test_unknown_preset_and_preset_routes():
    with pytest.raises(ValueError, match="preset"):
        RouteConfig.preset("dpo")
    with pytest.raises(ValueError, match="route"):
        RouteConfig.preset("gkd", routes=[RouteSpec("self", "rkl", "full")] * 4)


@pytest.mark.parametrize(
    "changes,name",
    [
        (dict(student=torch.randn(2, 3, 4)), "self_logits"),
        (dict(teacher=torch.randn(2, 3, 4)), "teacher_logits"),
        (dict(teacher=torch.randn(2, 2, 5)), "teacher_logits"),
        (dict(targets=torch.zeros(2, 2, dtype=torch.int64)), "target_ids"),
        (dict(student=torch.full((2, 3, 5), float("nan")), selfl=torch.zeros(2, 3, 5)), "student_logits"),
        (dict(teacher=torch.full((2, 3, 6), float("nan"))), "teacher_logits"),
    ],
)
def test_bad_logits_are_named(changes, name):
    z = dict(student=torch.zeros(2, 3, 5), teacher=torch.zeros(2, 3, 6), selfl=torch.zeros(2, 3, 5),
             targets=torch.zeros(2, 3, dtype=torch.int64))
    z.update(changes)
    with pytest.raises(ValueError, match=name):
        routed_loss_from_logits(z["student"], z["teacher"], z["selfl"], z["targets"])
