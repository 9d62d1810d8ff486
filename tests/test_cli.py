"""The dopd command line: config parsing, bad inputs, and a 2-step CPU run of the default task."""

import json
import os

import pytest
import torch
import yaml

from dopd.cli import main
from dopd.config import ConfigError, TrainConfig, apply_overrides, load_yaml, resolve_config


@pytest.fixture
def one_thread():
    """Tiny models run fastest single-threaded; restore the setting for other tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _parse(argv):
    from dopd.cli import _parser
    from dopd.config import flag_overrides

    args = _parser().parse_args(["train", *argv])
    return resolve_config(args.config, flag_overrides(args))


def test_flags_override_yaml_override_defaults(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text(yaml.safe_dump({"student": "s", "teacher": "t", "data": "d.jsonl", "max-steps": 7,
                                 "learning_rate": 1e-4, "loss": {"top_k": 32}}))
    cfg = _parse(["--config", str(y), "--max-steps", "9", "--preset", "gkd", "--loss", "beta_weak=0.5",
                  "--no-progress", "--resume"])
    assert (cfg.student, cfg.teacher, cfg.data) == ("s", "t", "d.jsonl")
    assert cfg.max_steps == 9 and cfg.learning_rate == 1e-4 and cfg.preset == "gkd"
    assert cfg.loss == {"top_k": 32, "beta_weak": 0.5}
    assert cfg.progress is False and cfg.resume is True
    assert cfg.max_new_tokens == TrainConfig.max_new_tokens  # untouched fields keep the dataclass default


def test_no_model_means_embedded_default_config():
    cfg = _parse(["--max-steps", "3"])
    assert cfg.is_embedded_default and cfg.max_steps == 3
    assert cfg.learning_rate != TrainConfig.learning_rate  # the tiny task's own defaults apply


@pytest.mark.parametrize("overrides, message", [
    ({"max_steps": 0}, "max_steps"), ({"temperature": 0.0}, "temperature"), ({"top_p": 1.5}, "top_p"),
    ({"preset": "nope"}, "preset"), ({"student": "s"}, "together"), ({"bogus": 1}, "unknown"),
    ({"self_model": "average"}, "self_model"), ({"self_ema_decay": 1.0}, "self_ema_decay"),
    ({"task": "nope"}, "task"), ({"task_size": "huge"}, "task_size"),
])
def test_bad_config_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(TrainConfig(), overrides).validate()


def test_bad_config_file(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        resolve_config(str(y), {})
    with pytest.raises(SystemExit):
        main(["train", "--preset", "not-a-preset"])


def _save_pair(root, student_vocab, teacher_vocab, teacher_alphabet=None):
    """config.json + tokenizer only: the checks must fail before any weights are needed."""
    from transformers import LlamaConfig

    from dopd.tasks.tokenizer import ALPHABET, build_char_tokenizer

    paths = []
    for name, vocab, alphabet in (("s", student_vocab, ALPHABET), ("t", teacher_vocab, teacher_alphabet or ALPHABET)):
        path = str(root / name)
        LlamaConfig(vocab_size=vocab, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                    num_attention_heads=1).save_pretrained(path)
        build_char_tokenizer(alphabet).save_pretrained(path)
        paths.append(path)
    data = root / "d.jsonl"
    data.write_text(json.dumps({"prompt": "sum mod 5: 1+2", "privileged": "hint:"}) + "\n")
    return paths[0], paths[1], str(data)


@pytest.mark.parametrize("case, message", [
    ("small_teacher", "teacher vocabulary"),
    ("tokenizers", "tokenizers disagree"),
    ("missing_field", "missing field"),
    ("empty_prompt", "empty prompt"),
])
def test_bad_inputs_fail_before_loading_models(tmp_path, capsys, case, message):
    from dopd.tasks.tokenizer import ALPHABET

    n = len(ALPHABET) + 4
    if case == "small_teacher":
        s, t, d = _save_pair(tmp_path, n, n - 1)
    elif case == "tokenizers":
        s, t, d = _save_pair(tmp_path, n, n, teacher_alphabet=ALPHABET[::-1])
    else:
        s, t, d = _save_pair(tmp_path, n, n)
        row = {"prompt": "x"} if case == "missing_field" else {"prompt": "", "privileged": "h"}
        open(d, "w").write(json.dumps(row) + "\n")
    # No weights exist in s/ or t/: reaching a model load would raise OSError, not this message.
    rc = main(["train", "--student", s, "--teacher", t, "--data", d, "--output-dir", str(tmp_path / "out")])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_default_task_two_steps_through_cli(tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    rc = main(["train", "--task-size", "tiny", "--max-steps", "2", "--output-dir", str(out),
               "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--max-new-tokens", "12",
               "--prompts-per-step", "2", "--num-generations", "2"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "student accuracy (dopd):" in text and "teacher accuracy" in text
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    for key in ("frac/LH", "frac/LL", "frac/HT", "frac/HS", "loss/HT", "adv_gap_mean", "q_self_mean",
                "q_teacher_mean", "student_entropy", "tokens_per_s", "lr", "grad_norm"):
        assert key in train_rows[0], key
    assert abs(sum(train_rows[0][f"frac/{r}"] for r in ("LH", "LL", "HT", "HS")) - 1.0) < 1e-6
    assert sum("eval/accuracy" in r for r in rows) == 3  # before, after step 1 (tiny: eval_every 1), after
    assert os.path.isfile(out / "checkpoint-2" / "model.safetensors")
    assert json.load(open(out / "config.json"))["self_model"] == "frozen"  # the embedded task's anchor
    # The teacher is cached: a second run reuses it (and runs the paper's live self).
    rc = main(["train", "--task-size", "tiny", "--max-steps", "1", "--output-dir", str(tmp_path / "run2"),
               "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--max-new-tokens", "8",
               "--preset", "vanilla_opd", "--prompts-per-step", "2", "--num-generations", "2",
               "--self-model", "live"])
    assert rc == 0 and "cached" in capsys.readouterr().out
    # dopd plot and dopd eval on the result.
    assert main(["plot", str(out)]) == 0
    assert os.path.getsize(out / "training.png") > 1000
    assert main(["eval", "--model", str(out / "checkpoint-2"), "--data", str(out / "data" / "eval.jsonl"),
                 "--max-new-tokens", "8", "--limit", "4", "--output", str(tmp_path / "e.json")]) == 0
    assert json.load(open(tmp_path / "e.json"))["n"] == 4


def test_yaml_scalars_are_coerced_to_field_types(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 5e-6\nmax_steps: '12'\nuse_chat_template: 'no'\n")  # PyYAML: '5e-6' is a str
    cfg = apply_overrides(TrainConfig(), load_yaml(str(path)))
    assert cfg.learning_rate == 5e-6 and isinstance(cfg.learning_rate, float)
    assert cfg.max_steps == 12 and cfg.use_chat_template is False
    cfg.validate()
    with pytest.raises(ConfigError, match="learning_rate"):
        apply_overrides(TrainConfig(), {"learning_rate": "fast"})
