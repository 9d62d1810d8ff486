"""DOPDTrainer around the loss: bad input refused before training, the TRL version check, the config
fields, the logit post-processing read from model configs, and the example script end to end."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import pathlib
import sys
import tomllib

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import _trl_setup as setup  # noqa: E402
from dopd.integrations.trl import TRL_TESTED_RANGE, DOPDConfig, DOPDTrainer, TRLVersionError  # noqa: E402
from dopd.integrations.trl import check_trl_version  # noqa: E402
from dopd.integrations.trl.heads import logit_transform  # noqa: E402
from dopd.integrations.trl.privileged import privileged_prompt  # noqa: E402
from dopd_kernels import LogitTransform  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMON = dict(report_to="none", bf16=False, use_cpu=True, gradient_checkpointing=False, max_completion_length=6,
              per_device_train_batch_size=2, logging_steps=1, save_strategy="no", route_top_k=8)


@pytest.fixture(scope="module")
def tok():
    return setup.tokenizer()


@pytest.fixture(scope="module")
def models(tok):
    return setup.tiny_llama("student", tok, 0, torch.float32), setup.tiny_llama("teacher", tok, 1, torch.float32)


def _trainer(tmp_path, models, tok, rows=None, **config):
    student, teacher = models
    rows = setup.examples(4) if rows is None else rows
    return DOPDTrainer(model=student, teacher_model=teacher, args=DOPDConfig(output_dir=str(tmp_path), **COMMON,
                                                                             **config),
                       train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)


# ------------------------------------------------------------------------------------------- bad input

def test_dataset_without_privileged_context(tmp_path, models, tok):
    rows = [{"prompt": r["prompt"]} for r in setup.examples(4)]
    with pytest.raises(ValueError, match="train_dataset.*privileged_context"):
        _trainer(tmp_path, models, tok, rows=rows)


def test_batch_without_privileged_context_fails_before_generating(tmp_path, models, tok):
    """A streaming dataset's columns are unknown until read: the first batch is checked before sampling."""
    trainer = _trainer(tmp_path, models, tok)

    def no_sampling(*args, **kwargs):
        raise AssertionError("generated before checking the batch")

    trainer._generate_single_turn = no_sampling
    with pytest.raises(ValueError, match="privileged_context"):
        trainer._generate_and_score_completions([{"prompt": "1, add 3 mod 10, 2 times"}])
    with pytest.raises(ValueError, match="privileged_context"):
        trainer._generate_and_score_completions([{"prompt": "x", "privileged_context": None}])


def test_teacher_vocabulary_smaller_than_the_students(tmp_path, models, tok):
    student, _ = models
    small = setup.tiny_llama("teacher", tok, 1, torch.float32)
    small.resize_token_embeddings(len(tok) - 8)
    with pytest.raises(ValueError, match=r"teacher_model: its vocabulary \(48 .*student's \(56\)"):
        _trainer(tmp_path, (student, small), tok)


def test_padded_teacher_vocabulary_is_accepted(tmp_path, models, tok):
    """TRL's DistillationTrainer refuses a teacher with more vocabulary rows; the routed loss cuts them off."""
    student, teacher = models
    assert teacher.lm_head.weight.shape[0] == 64 > student.lm_head.weight.shape[0] == 56
    with pytest.raises(ValueError, match="vocab_size"):
        trl.DistillationTrainer(model=student, teacher_model=teacher,
                                args=trl.DistillationConfig(output_dir=str(tmp_path), report_to="none", bf16=False,
                                                            use_cpu=True),
                                train_dataset=datasets.Dataset.from_list(setup.examples(2)), processing_class=tok)
    _trainer(tmp_path, models, tok)


def test_trl_version_outside_the_tested_range(tmp_path, models, tok, monkeypatch):
    monkeypatch.delenv("DOPD_ALLOW_UNTESTED_TRL", raising=False)
    assert check_trl_version() == trl.__version__
    for version in ("1.15.2", "1.17.0", "2.0.0", "not-a-version"):
        with pytest.raises(TRLVersionError, match=r"trl>=1\.16,<1\.17.*dopd\[trl\]"):
            check_trl_version(version)
    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.raises(TRLVersionError, match="trl 1.17.0 is installed"):
        _trainer(tmp_path, models, tok)
    import dopd.integrations.trl as integration

    with pytest.raises(TRLVersionError, match="trl 1.17.0 is installed"):
        importlib.reload(integration)  # the import itself refuses
    monkeypatch.setenv("DOPD_ALLOW_UNTESTED_TRL", "1")
    with pytest.warns(RuntimeWarning, match="trl 1.17.0"):
        check_trl_version()


def test_tested_range_matches_the_trl_extra():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"trl{TRL_TESTED_RANGE}" in extras["trl"]
    assert f"trl{TRL_TESTED_RANGE}" in extras["dev"]


@pytest.mark.parametrize("field,value,match", [
    ("route_top_k", 0, "route_top_k must be an int >= 1"),
    ("route_trim", 1.5, "route_trim must be a number"),
    ("route_reduction", "mean", "route_reduction must be one of"),
    ("preset", "kd", "preset: unknown preset 'kd'"),
    ("route_table", {"LH": ["teacher", "rkl", "topk"]}, "route_table: missing route"),
    ("route_table", "{not json", "route_table: not valid JSON"),
    ("self_model", "ema", "self_model must be one of"),
    ("loss_backend", "cuda", "loss_backend must be one of"),
    ("privileged_prompt_template", "{prompt} {hint}", "privileged_prompt_template may only use"),
    ("privileged_prompt_template", "{privileged_context}", "must be a string containing {prompt}"),
])
def test_config_errors_name_the_field(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        DOPDConfig(output_dir=str(tmp_path), bf16=False, **{field: value})


def test_args_must_be_a_dopd_config(tmp_path, models, tok):
    student, teacher = models
    with pytest.raises(TypeError, match="DOPDConfig"):
        DOPDTrainer(model=student, teacher_model=teacher,
                    args=trl.DistillationConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True),
                    train_dataset=datasets.Dataset.from_list(setup.examples(2)), processing_class=tok)


# -------------------------------------------------------------------------------------- configuration

def test_route_config_from_fields(tmp_path):
    config = DOPDConfig(output_dir=str(tmp_path), bf16=False, route_top_k=32, route_beta_light=0.5,
                        route_beta_weak=0.2, route_trim=0.1, route_normalize="zscore", temperature=0.7,
                        route_reduction="token_mean", route_chunk_size=64).route_config()
    assert (config.top_k, config.beta_light, config.beta_weak, config.trim, config.normalize, config.temperature,
            config.reduction, config.chunk_size, config.jsd_beta) == (32, 0.5, 0.2, 0.1, "zscore", 0.7,
                                                                     "token_mean", 64, 0.5)
    assert [r.divergence for r in config.routes] == ["rkl", "rkl", "jsd", "rkl"]  # the paper's table
    # TRL's beta at its ends is a KL, not a (vanishing) JSD: every jsd route follows it.
    for beta, divergence in ((0.0, "fkl"), (1.0, "rkl")):
        routes = DOPDConfig(output_dir=str(tmp_path), bf16=False, beta=beta).route_config().routes
        assert routes[2].divergence == divergence and routes[0].divergence == "rkl"
    table = {name: {"source": "teacher", "divergence": "fkl", "support": "full", "weight": 2.0}
             for name in ("LH", "LL", "HT", "HS")}
    custom = DOPDConfig(output_dir=str(tmp_path), bf16=False, route_table=json.dumps(table)).route_config()
    assert all(r.divergence == "fkl" and r.weight == 2.0 for r in custom.routes)


def test_privileged_prompt_text_and_messages():
    tpl = "{prompt}\n\n{privileged_context}"
    assert privileged_prompt("Q", "hint", tpl) == "Q\n\nhint"
    assert privileged_prompt("Q", "", tpl) == "Q"  # no hint: the student's prompt
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Q"}]
    assert privileged_prompt(msgs, [{"role": "user", "content": "h1"}, {"role": "user", "content": "h2"}], tpl) == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "Q\n\nh1\nh2"}]
    with pytest.raises(ValueError, match="must end with a user turn"):
        privileged_prompt(msgs + [{"role": "assistant", "content": "A"}], "hint", tpl)
    with pytest.raises(ValueError, match="privileged_context must be a string"):
        privileged_prompt("Q", 3, tpl)


def test_conversational_prompts_use_the_chat_template(tmp_path, models, tok):
    """Student and privileged prompts both go through the tokenizer's chat template, the hint inside the user turn."""
    chat_tok = setup.tokenizer()
    chat_tok.chat_template = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }};{% endfor %}"
                              "{% if add_generation_prompt %}a:{% endif %}")
    rows = [{"prompt": [{"role": "user", "content": "1, add 3"}], "privileged_context": "hint: 4"},
            {"prompt": [{"role": "user", "content": "2, add 3"}], "privileged_context": ""}]
    trainer = _trainer(tmp_path, models, chat_tok, rows=rows)
    setup.fix_completions(trainer, [[10, 11], [12]])
    batch = trainer._generate_and_score_completions(rows)
    decode = [chat_tok.decode(ids[mask.bool()]) for ids, mask in zip(batch["privileged_prompt_ids"],
                                                                     batch["privileged_prompt_mask"])]
    assert decode == ["u:1, add 3\n\nhint: 4;a:", "u:2, add 3;a:"]
    assert chat_tok.decode(batch["prompt_ids"][0][batch["prompt_mask"][0].bool()]) == "u:1, add 3;a:"
    assert int(batch["num_sequences_in_batch"]) == 2 and int(batch["num_items_in_batch"]) == 3


class _Config:
    def __init__(self, **kw):
        self.__dict__.update(kw)

    def get_text_config(self):
        return self


class _Model:
    def __init__(self, **kw):
        self.config = _Config(**kw)


@pytest.mark.parametrize("attrs,expected", [
    ({}, LogitTransform()),
    ({"logit_scale": None}, LogitTransform()),  # MPT-style "no scale"
    ({"logit_scale": 0.0625}, LogitTransform(0.0625)),  # Cohere
    ({"output_multiplier": 2.0}, LogitTransform(2.0)),
    ({"lm_head_multiplier": 0.5}, LogitTransform(0.5)),  # Falcon-H1
    ({"logits_scaling": 8.0, "model_type": "granite"}, LogitTransform(0.125)),  # Granite divides
    ({"logits_scaling": 8.0, "model_type": "hyperclovax"}, LogitTransform(8.0)),  # HyperCLOVA X multiplies
    ({"final_logit_softcapping": 30.0}, LogitTransform(1.0, 30.0)),  # Gemma 2
    ({"logit_scale": 0.5, "final_logit_softcapping": 10.0}, LogitTransform(0.5, 10.0)),
])
def test_logit_transform_read_from_config(attrs, expected):
    assert logit_transform(_Model(**attrs)) == expected


def test_logit_transform_refuses_a_zero_scale():
    with pytest.raises(ValueError, match="_Model: logit_scale=0.0: expected a finite number > 0"):
        logit_transform(_Model(logit_scale=0.0))


def test_logit_transform_refuses_what_it_cannot_reproduce():
    """The trainer's reader, not TRL's: MiniCPM rescales its hidden states before the head."""
    with pytest.raises(ValueError, match="_Model: dim_model_base=256"):
        logit_transform(_Model(dim_model_base=256, model_type="minicpm"))


# --------------------------------------------------------------------------------------------- example

def _load_example():
    spec = importlib.util.spec_from_file_location("trl_dopd_example", ROOT / "examples" / "trl_dopd.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_example_two_steps_logs_route_fractions(tmp_path):
    """``python examples/trl_dopd.py --max-steps 2 --output-dir DIR`` (run in-process: same main, no re-import)."""
    out = tmp_path / "run"
    _load_example().main(["--max-steps", "2", "--output-dir", str(out), "--num-prompts", "16"])
    state = json.loads((out / "trainer_state.json").read_text())
    steps = [h for h in state["log_history"] if "dopd/frac/HT" in h]
    assert [h["step"] for h in steps] == [1, 2]
    for h in steps:
        fracs = [h[f"dopd/frac/{r}"] for r in ("LH", "LL", "HT", "HS")]
        assert abs(sum(fracs) - 1.0) < 1e-9 and all(0.0 <= f <= 1.0 for f in fracs)
        assert h["dopd/n_tokens"] > 0 and math.isfinite(h["loss"]) and h["loss"] >= 0
        assert 0.0 <= h["dopd/threshold/adv_gap_bar"] <= 1.0  # min-max normalized
    assert (out / "model.safetensors").is_file()
