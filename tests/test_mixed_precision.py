"""Mixed precision: fp32 masters that move at lr 5e-6, bf16 compute, bf16 frozen models, the policy object."""

from dataclasses import replace

import pytest
import torch

import dopd_kernels
from dopd.precision import Precision
from dopd.tasks.default import default_task_config, prepare_default_task
from dopd.trainer import Trainer


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = replace(default_task_config(), task_size="tiny", cache_dir=str(root / "cache"), output_dir=str(root / "data"),
                  progress=False, max_new_tokens=12, prompts_per_step=2, num_generations=2)
    cfg, _ = prepare_default_task(cfg, log=lambda s: None)
    yield root, cfg
    torch.set_num_threads(threads)


def test_precision_policy():
    fp32, bf16, fp16 = Precision("float32"), Precision("bfloat16"), Precision("float16")
    assert not fp32.mixed and bf16.mixed and fp16.mixed
    for p in (fp32, bf16, fp16):
        assert p.param_dtype == torch.float32  # masters and optimizer state, always
        assert p.frozen_dtype == p.compute_dtype
    cpu = torch.device("cpu")
    x = torch.randn(4, 4)
    with bf16.autocast(cpu):
        assert (x @ x).dtype == torch.bfloat16
    with fp32.autocast(cpu), bf16.autocast(cpu, enabled=False):  # FSDP2: the policy casts, autocast stays off
        assert (x @ x).dtype == torch.float32
    w = torch.randn(3, 4, requires_grad=True)
    bf16.loss_input(w).float().sum().backward()  # the cast is differentiable: the fp32 master gets the gradient
    assert w.grad is not None and w.grad.dtype == torch.float32
    assert fp16.grad_scaler(cpu).is_enabled() and not bf16.grad_scaler(cpu).is_enabled()
    policy = bf16.mp_policy()
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        Precision("fp8")


def test_bf16_step_moves_every_weight_with_a_gradient(tiny_task, monkeypatch):
    root, cfg = tiny_task
    cfg = replace(cfg, dtype="bfloat16", learning_rate=5e-6, max_steps=1, warmup_ratio=0.0, eval_data=None,
                  output_dir=str(root / "bf16-step"))
    trainer = Trainer(cfg, log=lambda s: None)
    trainer.setup()
    assert {p.dtype for p in trainer.student.parameters()} == {torch.float32}  # the masters
    assert {p.dtype for p in trainer.teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trainer.self_model.parameters()} == {torch.bfloat16}  # the embedded task's frozen self
    seen = {}
    real_loss = dopd_kernels.routed_loss

    def spy(*args, **kwargs):
        seen["dtypes"] = {a.dtype for a in args[:5]}
        seen["autocast"] = torch.is_autocast_enabled("cpu")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(dopd_kernels, "routed_loss", spy)
    before = [p.detach().clone() for p in trainer.student.parameters()]
    trainer.train_step()
    assert seen == {"dtypes": {torch.bfloat16}, "autocast": False}  # bf16 inputs, the loss outside autocast
    moved_any = False
    for p, old in zip(trainer.student.parameters(), before):
        assert p.grad is not None and p.grad.dtype == torch.float32
        # Adam's first step is lr * g / (|g| + eps): for |g| >> eps = 1e-8 it moves the weight by ~lr,
        # which an fp32 weight of any size in these models can represent (a bf16 one above ~1e-3 cannot).
        has_grad = p.grad.abs() > 1e-6
        moved = p.detach() != old
        assert moved[has_grad].all(), f"{int((~moved[has_grad]).sum())} weights with a gradient did not move"
        moved_any |= bool(moved.any())
    assert moved_any
    state = next(iter(trainer.optimizer.state.values()))
    assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32
    # The checkpoint holds the fp32 masters.
    ckpt = trainer.save()
    from safetensors.torch import load_file

    saved = load_file(f"{ckpt}/model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}
    for name, p in trainer.student.named_parameters():
        if name in saved:
            assert torch.equal(saved[name], p.detach()), name
