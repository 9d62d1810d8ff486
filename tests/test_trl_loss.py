"""DOPDTrainer's loss on a fixed batch: equal to routed_loss on independently computed hidden states, and
(preset gkd, token_mean, no privileged context) equal to TRL's own DistillationTrainer in loss and gradients."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from trl import DistillationConfig, DistillationTrainer  # noqa: E402
from trl.trainer.utils import split_tensor_dict  # noqa: E402

from dopd.integrations.trl import DOPDConfig, DOPDTrainer  # noqa: E402
from dopd_kernels import RouteConfig, routed_loss  # noqa: E402
import _trl_setup as setup  # noqa: E402

COMMON = dict(report_to="none", bf16=False, use_cpu=True, gradient_checkpointing=False, max_completion_length=8,
              logging_steps=1, save_strategy="no")


def _batch(trainer, rows, fixed):
    """The trainer's own generation batch for ``rows``, with ``fixed`` completions instead of samples."""
    setup.fix_completions(trainer, fixed)
    trainer.model.train()
    return trainer._generate_and_score_completions(rows)


def _loss_and_grads(trainer, micro_batches):
    """Sum of the micro-batch losses (as the optimizer step accumulates them) and the student's gradients."""
    trainer.model.zero_grad(set_to_none=True)
    total = 0.0
    for mb in micro_batches:
        loss = trainer.compute_loss(trainer.model, mb)
        loss.backward()
        total += float(loss.detach())
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return total, grads


def _assert_grads_close(actual, expected, rel):
    """Every gradient within ``rel`` x its largest entry (elementwise rtol fails on entries near 0)."""
    for name, g in expected.items():
        err = (actual[name] - g).abs().max().item()
        assert err <= rel * g.abs().max().item(), (name, err, g.abs().max().item())


def _direct_hidden(model, context, completion):
    """Unpadded single-sequence forward: hidden states at the positions that predict ``completion``."""
    ids = torch.tensor([context + completion])
    hidden = model.model(input_ids=ids).last_hidden_state[0]
    return hidden[len(context) - 1: len(context) - 1 + len(completion)]


def _stack(rows, width):
    """Right-pad (len_i, H) tensors with zeros to (B, width, H)."""
    out = rows[0].new_zeros((len(rows), width, rows[0].shape[-1]))
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


@pytest.mark.parametrize("self_model,reduction", [("live", "seq_mean"), ("frozen", "token_mean")])
def test_loss_equals_routed_loss_on_direct_hidden_states(tmp_path, self_model, reduction):
    tok = setup.tokenizer()
    student = setup.tiny_llama("student", tok, seed=0)
    teacher = setup.tiny_llama("teacher", tok, seed=1)  # 64 vocabulary rows for the student's 56
    rows = setup.examples(4, seed=3, empty_every=4)  # the last example has no privileged context
    fixed = setup.completions(4, len(tok), seed=4, lengths=[6, 2, 8, 5])
    args = DOPDConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, route_top_k=8, temperature=0.9,
                      self_model=self_model, route_reduction=reduction, **COMMON)
    trainer = DOPDTrainer(model=student, teacher_model=teacher, args=args,
                          train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    loss, grads = _loss_and_grads(trainer, [_batch(trainer, rows, fixed)])

    # The same loss from scratch: each example alone (no padding), the privileged prompt written out.
    student.zero_grad(set_to_none=True)
    s_h, p_h, t_h = [], [], []
    for row, comp in zip(rows, fixed):
        ctx = tok(row["prompt"])["input_ids"]
        hint = row["privileged_context"]
        priv = tok(setup.TEMPLATE.format(prompt=row["prompt"], privileged_context=hint) if hint else row["prompt"]
                   )["input_ids"]
        s_h.append(_direct_hidden(student, ctx, comp))
        with torch.no_grad():
            p_h.append(_direct_hidden(student, priv, comp))
            t_h.append(_direct_hidden(teacher, priv, comp))
    width = max(len(c) for c in fixed)
    ids = torch.zeros((4, width), dtype=torch.long)
    mask = torch.zeros((4, width), dtype=torch.bool)
    for i, c in enumerate(fixed):
        ids[i, : len(c)], mask[i, : len(c)] = torch.tensor(c), True
    config = RouteConfig.preset("dopd", top_k=8, temperature=0.9, reduction=reduction)
    out = routed_loss(_stack(s_h, width), student.lm_head.weight, _stack(t_h, width), teacher.lm_head.weight,
                      _stack(p_h, width), ids, mask, config=config, backend="reference")
    out.loss.backward()

    assert (out.route[mask] >= 0).all() and len(set(out.route[mask].tolist())) >= 3  # several routes are hit
    # float64 models, but Llama's rotary tables are float32 and TRL's batched passes shift the positions of
    # left-padded rows (no position_ids): ~1e-7 relative. A misaligned position changes the loss at O(1).
    torch.testing.assert_close(torch.tensor(loss, dtype=torch.float64), out.loss.detach(), rtol=1e-6, atol=1e-9)
    assert grads.keys() == {n for n, p in student.named_parameters() if p.grad is not None}
    _assert_grads_close(grads, {n: p.grad for n, p in student.named_parameters()}, rel=1e-5)


def test_seq_mean_over_accumulation_steps(tmp_path):
    """Two micro-batches of one optimizer step add up to seq_mean over the whole batch (gkd: routes don't matter)."""
    tok = setup.tokenizer()
    student, teacher = setup.tiny_llama("student", tok, seed=0), setup.tiny_llama("teacher", tok, seed=1)
    rows = setup.examples(4, seed=5)
    fixed = setup.completions(4, len(tok), seed=6, lengths=[7, 1, 3, 8])
    args = DOPDConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                      preset="gkd", route_top_k=8, **COMMON)
    trainer = DOPDTrainer(model=student, teacher_model=teacher, args=args,
                          train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    batch = _batch(trainer, rows, fixed)
    split_loss, split_grads = _loss_and_grads(trainer, split_tensor_dict(batch, 2))
    # The whole generation batch as one micro-batch: its scale is 1, the loss is seq_mean over all four.
    whole_loss, whole_grads = _loss_and_grads(trainer, [batch])
    assert abs(split_loss - whole_loss) <= 1e-10 * abs(whole_loss)
    _assert_grads_close(split_grads, whole_grads, rel=1e-9)


def _gemma2(tok, seed):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                       final_logit_softcapping=2.0, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, tie_word_embeddings=False, initializer_range=0.3)
    torch.manual_seed(seed)
    return Gemma2ForCausalLM(cfg).to(torch.float64)


def _cohere(tok, seed):
    from transformers import CohereConfig, CohereForCausalLM

    cfg = CohereConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, logit_scale=0.25,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       tie_word_embeddings=False, initializer_range=0.3)
    torch.manual_seed(seed)
    return CohereForCausalLM(cfg).to(torch.float64)


def _llama(tok, seed):
    return setup.tiny_llama("student", tok, seed=seed)


@pytest.mark.parametrize("family,beta", [("llama", 0.0), ("llama", 0.5), ("llama", 1.0), ("gemma2", 0.3),
                                         ("cohere", 0.7)])
def test_gkd_matches_trl_distillation_trainer(tmp_path, family, beta):
    """TRL as the judge: same batch, same beta and temperature, two accumulation steps -> same loss and gradients.

    Gemma 2 soft-caps its logits and Cohere scales them: the trainer passes them to routed_loss as
    LogitTransforms, on the default (PyTorch) path.
    """
    tok = setup.tokenizer()
    build = {"llama": _llama, "gemma2": _gemma2, "cohere": _cohere}[family]
    student, teacher = build(tok, 0), build(tok, 1)
    rows = setup.examples(4, seed=7, empty_every=1)  # no privileged context: the teacher sees the plain prompt
    fixed = setup.completions(4, len(tok), seed=8, lengths=[3, 8, 5, 1])
    common = dict(COMMON, per_device_train_batch_size=2, gradient_accumulation_steps=2, beta=beta, temperature=0.8)
    dataset = datasets.Dataset.from_list(rows)
    backend = "torch"
    results = []
    for cls, args in ((DistillationTrainer, DistillationConfig(output_dir=str(tmp_path / "trl"), **common)),
                      (DOPDTrainer, DOPDConfig(output_dir=str(tmp_path / "dopd"), preset="gkd", route_top_k=8,
                                               route_reduction="token_mean", loss_backend=backend, **common))):
        trainer = cls(model=copy.deepcopy(student), teacher_model=teacher, args=args, train_dataset=dataset,
                      processing_class=tok)
        results.append(_loss_and_grads(trainer, split_tensor_dict(_batch(trainer, rows, fixed), 2)))
    (trl_loss, trl_grads), (dopd_loss, dopd_grads) = results
    assert trl_loss > 0
    # TRL's chunked divergence accumulates in float32 whatever the input dtype: float32-level agreement.
    assert abs(dopd_loss - trl_loss) <= 2e-6 * trl_loss
    assert dopd_grads.keys() == trl_grads.keys() and len(trl_grads) > 0
    _assert_grads_close(dopd_grads, trl_grads, rel=1e-5)


def test_frozen_self_of_a_peft_student_is_the_base_model(tmp_path):
    """With LoRA, self_model='frozen' is the base model with the adapters off: the same self pass as a plain copy
    of the initial student run live, while the student pass does use the adapters."""
    peft = pytest.importorskip("peft")
    tok = setup.tokenizer()
    base, teacher = setup.tiny_llama("student", tok, seed=0), setup.tiny_llama("teacher", tok, seed=1)
    rows = setup.examples(4, seed=9, empty_every=3)
    fixed = setup.completions(4, len(tok), seed=10)
    seen = {}

    def run(model, name, **config):
        class Recording(DOPDTrainer):
            def _routed_loss(self, **kwargs):
                seen[name] = {k: kwargs[k].detach().clone() for k in ("student_hidden", "self_hidden")}
                return super()._routed_loss(**kwargs)

        args = DOPDConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=4, route_top_k=8, **COMMON,
                          **config)
        trainer = Recording(model=model, teacher_model=teacher, args=args,
                            train_dataset=datasets.Dataset.from_list(rows), processing_class=tok, **(
                                {"peft_config": peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])}
                                if name == "lora" else {}))
        if name == "lora":  # LoRA starts as the identity (B = 0): make the adapters change the model
            for n, p in trainer.model.named_parameters():
                if "lora_B" in n:
                    torch.nn.init.normal_(p, std=0.5)
        return _loss_and_grads(trainer, [_batch(trainer, rows, fixed)])

    _, lora_grads = run(copy.deepcopy(base), "lora", self_model="frozen")
    run(copy.deepcopy(base), "plain", self_model="live")
    torch.testing.assert_close(seen["lora"]["self_hidden"], seen["plain"]["self_hidden"], rtol=1e-12, atol=1e-12)
    assert (seen["lora"]["student_hidden"] - seen["plain"]["student_hidden"]).abs().max() > 1e-3
    assert lora_grads and all("lora_" in n for n in lora_grads)  # only the adapters train (TRL's PEFT set-up)
