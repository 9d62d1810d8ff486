"""Checkpoints and --resume: 4 steps straight equal 2 steps + resume + 2 steps, weight for weight."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dataclasses import replace

from dopd.tasks.default import default_task_config, prepare_default_task
from dopd.trainer import Trainer, batch_indices


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add synchronisation
    cfg = replace(default_task_config(), task_size="tiny", cache_dir=str(root / "cache"),
                  output_dir=str(root / "data"), progress=False, max_new_tokens=12, prompts_per_step=2,
                  num_generations=2)
    cfg, _ = prepare_default_task(cfg, log=lambda s: None)
    yield root, cfg
    torch.set_num_threads(threads)


def _weights(ckpt):
    return load_file(os.path.join(ckpt, "model.safetensors"))


def test_batch_indices_cover_each_epoch_once():
    seen = [i for s in range(5) for i in batch_indices(s, 10, 2, seed=3)]
    assert sorted(seen) == list(range(10))
    assert batch_indices(7, 10, 4, seed=3) == batch_indices(7, 10, 4, seed=3)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_resume_reproduces_uninterrupted_run(tiny_task, dtype):
    root, cfg = tiny_task
    root = root / dtype
    # bfloat16: mixed precision; the checkpoints hold the fp32 masters, so resuming loses nothing.
    common = dict(max_steps=4, save_every=2, keep_checkpoints=5, eval_data=None, grad_accum=2, dtype=dtype)
    straight = replace(cfg, **common, output_dir=str(root / "straight"))
    Trainer(straight, log=lambda s: None).train()
    # "Interrupt" after step 2: a fresh directory holding only what existed then.
    resumed_dir = root / "resumed"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(root / "straight" / "checkpoint-2", resumed_dir / "checkpoint-2")
    resumed = replace(cfg, **common, output_dir=str(resumed_dir), resume=True)
    trainer = Trainer(resumed, log=lambda s: None)
    trainer.setup()
    assert trainer.step == 2
    trainer.train()
    a, b = _weights(root / "straight" / "checkpoint-4"), _weights(resumed_dir / "checkpoint-4")
    c = _weights(root / "straight" / "checkpoint-2")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == torch.float32 and torch.equal(a[k], b[k]), k
    assert any(not torch.equal(a[k], c[k]) for k in a)  # steps 3-4 really changed the student
    # metrics.jsonl of the resumed run continues at step 3 (step 1-2 rows are absent: not in that dir).
    rows = [json.loads(l) for l in open(resumed_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [3, 4]


def test_a_non_finite_gradient_norm_stops_before_the_step(tiny_task, monkeypatch):
    """A finite loss with inf/NaN gradients (no fp16 scaler to skip the step) raises and leaves the weights."""
    import dopd.trainer as trainer_module

    root, cfg = tiny_task
    trainer = Trainer(replace(cfg, max_steps=1, eval_data=None, output_dir=str(root / "nan-grad")), log=lambda s: None)
    trainer.setup()
    real = trainer_module.clip_grad_norm
    monkeypatch.setattr(trainer_module, "clip_grad_norm", lambda params, max_norm: real(params, max_norm) * float("nan"))
    before = [p.detach().clone() for p in trainer.student.parameters()]
    with pytest.raises(FloatingPointError, match="non-finite gradient norm at step 1"):
        trainer.train_step()
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, trainer.student.parameters()))
    assert trainer.step == 0
