"""The privileged self: the EMA update, the self model kinds, and the live self's gradient path and signals."""

import copy
from dataclasses import replace

import pytest
import torch

from dopd.self_model import EmaSelf, make_self_model


class _WithBuffer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.register_buffer("count", torch.zeros(()))


def test_ema_update_is_decay_times_old_plus_rest_times_new():
    model = _WithBuffer()
    ema = EmaSelf(model, decay=0.9)
    assert not any(p.requires_grad for p in ema.model.parameters()) and not ema.model.training
    old = {k: v.clone() for k, v in ema.model.state_dict().items()}
    with torch.no_grad():
        model.lin.weight.add_(torch.randn_like(model.lin.weight))
        model.lin.bias.add_(1.0)
        model.count.fill_(7)
    ema.update(model)
    for name in ("lin.weight", "lin.bias"):
        expect = 0.9 * old[name] + 0.1 * model.state_dict()[name]
        torch.testing.assert_close(ema.model.state_dict()[name], expect, rtol=0, atol=1e-6)
    assert ema.model.count.item() == 7 and ema.updates == 1  # buffers are copied, not averaged
    # The EMA is a copy: training the model further never writes into it.
    before = ema.model.lin.weight.clone()
    with torch.no_grad():
        model.lin.weight.mul_(3)
    assert torch.equal(ema.model.lin.weight, before)
    state = ema.state_dict()
    fresh = EmaSelf(_WithBuffer(), decay=0.5)
    fresh.load_state_dict(state)
    assert fresh.decay == 0.9 and fresh.updates == 1 and torch.equal(fresh.model.lin.weight, before)
    zero = EmaSelf(model, decay=0.0)
    zero.update(model)
    assert torch.equal(zero.model.lin.weight, model.lin.weight)
    with pytest.raises(ValueError, match="decay"):
        EmaSelf(model, decay=1.0)


def test_make_self_model_kinds():
    model = torch.nn.Linear(2, 2)
    frozen = torch.nn.Linear(2, 2)
    assert make_self_model("live", 0.9, model, lambda: frozen) == (None, None)
    assert make_self_model("frozen", 0.9, model, lambda: frozen) == (frozen, None)
    self_model, ema = make_self_model("ema", 0.9, model, lambda: frozen)
    assert self_model is ema.model and torch.equal(self_model.weight, model.weight)
    with pytest.raises(ValueError, match="self_model"):
        make_self_model("other", 0.9, model, lambda: frozen)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from dopd.tasks.default import default_task_config, prepare_default_task

    root = tmp_path_factory.mktemp("self")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = replace(default_task_config(size="tiny"), task_size="tiny", cache_dir=str(root / "cache"),
                  output_dir=str(root / "data"), progress=False, max_new_tokens=10, eval_data=None)
    cfg, _ = prepare_default_task(cfg, log=lambda s: None)
    yield root, replace(cfg, eval_data=None)
    torch.set_num_threads(threads)


def test_trainer_ema_self_follows_the_student(tiny):
    from dopd.checkpoint import load_state
    from dopd.trainer import Trainer

    root, cfg = tiny
    trainer = Trainer(replace(cfg, self_model="ema", self_ema_decay=0.5, max_steps=2, output_dir=str(root / "ema")),
                      log=lambda s: None)
    trainer.setup()
    assert trainer.self_model is trainer.self_ema.model
    expect = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    for _ in range(2):
        trainer.train_step()
        expect = {k: 0.5 * expect[k] + 0.5 * v for k, v in trainer.student.state_dict().items()}
    got = trainer.self_ema.model.state_dict()
    for k in expect:
        torch.testing.assert_close(got[k], expect[k], rtol=0, atol=1e-6)
    assert any(not torch.equal(got[k], trainer.student.state_dict()[k]) for k in got)  # it lags the student
    state = load_state(trainer.save())
    assert state["self_ema"]["updates"] == 2  # a resumed run restores it


def test_live_self_pass_has_no_gradient_path_and_aligned_signals(tiny):
    """The live self is the student under no_grad with the hint: its loss and gradients equal those with a
    detached copy of the student as the self, and q_self is the hinted pass's probability of each token."""
    from dopd.passes import build_pass_batch
    from dopd.trainer import Trainer

    root, cfg = tiny
    trainer = Trainer(replace(cfg, preset="sdpo", output_dir=str(root / "live")), log=lambda s: None)
    trainer.setup()
    recs = trainer.records[:2]
    results = []
    for self_model in (None, copy.deepcopy(trainer.student).requires_grad_(False)):
        trainer.student.zero_grad(set_to_none=True)
        torch.manual_seed(11)
        trainer.self_model = self_model  # None: the live student through its wrapped forward
        out, _ = trainer.micro_batch(recs)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in trainer.student.named_parameters() if p.grad is not None}))
    (live, g_live), (copied, g_copy) = results
    torch.testing.assert_close(live.loss, copied.loss)
    assert g_live.keys() == g_copy.keys() and g_live
    for name in g_live:
        torch.testing.assert_close(g_live[name], g_copy[name])
    # The self signal, recomputed from full logits of the hinted pass at the sampled tokens.
    group = [r for r in recs for _ in range(cfg.num_generations)]
    ctx = trainer.template.encode(trainer.tokenizer, group, privileged=True)
    torch.manual_seed(11)
    from dopd.rollout import generate

    roll = generate(trainer.student, trainer.tokenizer,
                    trainer.template.encode(trainer.tokenizer, group, privileged=False),
                    max_new_tokens=cfg.max_new_tokens, do_sample=True, temperature=cfg.temperature)
    batch = build_pass_batch(ctx, roll.tokens, roll.mask, trainer.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = trainer.student(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 position_ids=batch.position_ids).logits
    logp = logits[:, batch.start: batch.start + batch.num_response].log_softmax(-1)
    q = logp.gather(-1, roll.tokens[..., None]).squeeze(-1).exp()
    torch.testing.assert_close(live.q_self[roll.mask].float(), q[roll.mask], rtol=1e-4, atol=1e-5)
