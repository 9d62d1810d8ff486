"""Families that post-process their logits: the trainer's log-probs are the model's own, or it refuses.

For tiny random-init Granite (divides by logits_scaling), Falcon-H1 (lm_head_multiplier), Gemma 2
(final soft-cap), Cohere (logit_scale) and a multimodal Gemma 4 (soft-cap in text_config), one
trainer micro-batch's per-token log-probs (student; self and teacher through q_self / q_teacher)
equal the log-softmax of each model's own full forward on the unpadded sequence. Families the loss
cannot reproduce are refused from their config, before any weights load.
"""

import json
import os

import pytest
import torch
import transformers as tf

import dopd.trainer as trainer_mod
from dopd.cli import main
from dopd.config import TrainConfig
from dopd.passes import logit_transform, verify_logit_transform
from dopd.preflight import logit_transforms
from dopd_kernels import LogitTransform

SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=128, **SPECIAL)


def _configs():
    """family -> (config, the LogitTransform its model applies)."""
    return {
        "granite": (tf.GraniteConfig(**TEXT, logits_scaling=4.0, embedding_multiplier=3.0, residual_multiplier=0.5,
                                     attention_multiplier=0.2), LogitTransform(scale=0.25)),
        "falcon_h1": (tf.FalconH1Config(**TEXT, head_dim=16, lm_head_multiplier=0.37, mamba_d_ssm=32, mamba_n_heads=2,
                                        mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=16),
                      LogitTransform(scale=0.37)),
        "gemma2": (tf.Gemma2Config(**TEXT, head_dim=16, final_logit_softcapping=2.0), LogitTransform(softcap=2.0)),
        "cohere": (tf.CohereConfig(**TEXT, logit_scale=0.5), LogitTransform(scale=0.5)),
        "gemma4_multimodal": (tf.Gemma4Config(
            text_config=dict(TEXT, num_hidden_layers=2, head_dim=16, final_logit_softcapping=2.0,
                             vocab_size_per_layer_input=64, hidden_size_per_layer_input=8, sliding_window=16,
                             layer_types=["sliding_attention", "full_attention"]),
            vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=2, head_dim=8, patch_size=4, position_embedding_size=64),
            audio_config=None, boi_token_id=60, eoi_token_id=61, image_token_id=62, video_token_id=63,
            boa_token_id=59, eoa_token_index=58, audio_token_id=57), LogitTransform(softcap=2.0)),
    }


FAMILIES = list(_configs())


def test_logit_transform_reads_every_setting():
    for family, (config, want) in _configs().items():
        assert logit_transform(config) == want, family
    assert logit_transform(tf.LlamaConfig()).is_identity
    assert logit_transform(tf.HyperCLOVAXConfig(logits_scaling=2.0)) == LogitTransform(scale=2.0)  # multiplies
    assert logit_transform(tf.GraniteConfig(logits_scaling=1.0)).is_identity
    m3 = tf.MiniCPM3Config(hidden_size=256, dim_model_base=64, num_attention_heads=4)
    assert logit_transform(m3) == LogitTransform(scale=0.25)  # hidden / (256 / 64) before a bias-free head
    assert logit_transform(tf.RecurrentGemmaConfig(logits_soft_cap=30.0)) == LogitTransform(softcap=30.0)
    assert logit_transform(tf.CohereConfig(logit_scale=None)).is_identity  # None means unscaled


@pytest.mark.parametrize("config, setting", [
    (tf.MptConfig(logit_scale=0.5), "logit_scale"),  # transformers' MPT ignores it, the original applies it
    (tf.Gemma3Config(text_config=dict(final_logit_softcapping=30.0)), "final_logit_softcapping"),  # ignored there
    (tf.PretrainedConfig(dim_model_base=256), "dim_model_base"),  # MiniCPM (remote code): hidden rescaled
    (tf.PretrainedConfig(logit_scale=2.0, logits_scaling=4.0), "logit_scale and logits_scaling"),
    (tf.Gemma2Config(final_logit_softcapping=0.0), "final_logit_softcapping=0.0"),
    (tf.CohereConfig(logit_scale=-1.0), "logit_scale=-1.0"),
    (tf.InklingConfig(vocab_size=100, unpadded_vocab_size=90), "unpadded_vocab_size"),
], ids=["mpt", "gemma3-mm", "minicpm", "two-scales", "cap-0", "negative", "inkling-cut"])
def test_unmodelled_postprocessing_is_refused(config, setting):
    with pytest.raises(ValueError, match=setting.replace("(", r"\(")) as info:
        logit_transform(config, name="--student x")
    assert "--student x" in str(info.value)


def _save(root, family, seed, scale_head=25.0):
    """A random-init model of ``family`` with a sharpened head (so every post-processing step matters)
    and the char tokenizer, saved like a checkpoint."""
    from dopd.tasks.tokenizer import build_char_tokenizer

    torch.manual_seed(seed)
    config, _ = _configs()[family]
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale_head)
    path = str(root / f"{family}-{seed}")
    model.save_pretrained(path)
    build_char_tokenizer().save_pretrained(path)
    return path


def _data(root):
    path = root / "d.jsonl"
    rows = [{"prompt": "3, add 3", "privileged": "hint: 6"}, {"prompt": "12 ; 7", "privileged": "hint: 1"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _direct_logprobs(model, context, response):
    """log p(response[t] | context, response[:t]) from the model's own forward (its logits, its softmax)."""
    ids = torch.tensor([list(context) + list(response)])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0].double()
    pos = torch.arange(len(context) - 1, len(context) - 1 + len(response))
    return torch.log_softmax(logits[pos], -1).gather(-1, torch.tensor(response)[:, None])[:, 0]


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("family", FAMILIES)
def test_trainer_logprobs_are_the_models_own(tmp_path, monkeypatch, family, backend):
    student, teacher, data = _save(tmp_path, family, 1), _save(tmp_path, family, 2), _data(tmp_path)
    out_dir = tmp_path / "out"
    cfg = TrainConfig(student=student, teacher=teacher, data=data, output_dir=str(out_dir), loss_backend=backend,
                      num_generations=2, prompts_per_step=2, max_new_tokens=6, progress=False)
    trainer = trainer_mod.Trainer(cfg, log=lambda s: None)
    trainer.setup()
    assert trainer.transforms["student_transform"] == _configs()[family][1]
    rollouts = []
    real_rollout = trainer.rollout
    monkeypatch.setattr(trainer, "rollout", lambda *a, **k: rollouts.append(real_rollout(*a, **k)) or rollouts[-1])
    records = trainer.records
    out, _ = trainer.micro_batch(records)
    roll = rollouts[0]
    group = [r for r in records for _ in range(cfg.num_generations)]
    plain = trainer.template.encode(trainer.tokenizer, group, privileged=False)
    hinted = trainer.template.encode(trainer.tokenizer, group, privileged=True)
    tol = dict(atol=2e-5, rtol=2e-5)
    for i, n in enumerate(roll.lengths.tolist()):
        resp = roll.tokens[i, :n].tolist()
        torch.testing.assert_close(out.student_logprob[i, :n].double(),
                                   _direct_logprobs(trainer.student, plain[i], resp), **tol)
        torch.testing.assert_close(out.q_self[i, :n].double().log(),
                                   _direct_logprobs(trainer.student, hinted[i], resp), **tol)
        torch.testing.assert_close(out.q_teacher[i, :n].double().log(),
                                   _direct_logprobs(trainer.teacher, hinted[i], resp), **tol)


@pytest.mark.parametrize("family", ["granite", "gemma2"])
def test_identity_transform_would_be_caught_after_loading(tmp_path, family):
    """The post-load guard: dropping the post-processing gives log-probs the model does not produce."""
    model = tf.AutoModelForCausalLM.from_pretrained(_save(tmp_path, family, 1)).eval()
    verify_logit_transform(model, _configs()[family][1], "ok")
    with pytest.raises(ValueError, match="post-processes its logits"):
        verify_logit_transform(model, LogitTransform(), f"--student {family}")


@pytest.mark.parametrize("config, setting", [
    (tf.MptConfig(vocab_size=64, d_model=16, n_heads=2, n_layers=1, logit_scale=0.5), "logit_scale"),
    (tf.Gemma3Config(text_config=dict(TEXT, head_dim=16, final_logit_softcapping=30.0)), "final_logit_softcapping"),
], ids=["mpt", "gemma3-mm"])
def test_refused_from_the_config_before_weights_load(tmp_path, monkeypatch, capsys, config, setting):
    from dopd.tasks.tokenizer import build_char_tokenizer

    path = str(tmp_path / "m")
    config.save_pretrained(path)  # config.json only: no weights exist to load
    build_char_tokenizer().save_pretrained(path)
    data = _data(tmp_path)
    monkeypatch.setattr(tf.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded"))
    rc = main(["train", "--student", path, "--teacher", path, "--data", data, "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("dopd train: error: ") and setting in err[0]
    assert f"--student {path}" in err[0]
    assert not os.path.exists(tmp_path / "o")
    with pytest.raises(Exception):
        logit_transforms(path, path)
