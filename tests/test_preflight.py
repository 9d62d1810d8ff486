"""Bad flags, files and models fail before anything loads: one line, exit 2, nothing written.

Every case runs ``dopd train`` / ``dopd eval`` in-process with the weight loader patched to fail the
test if it is ever called, and checks: exit status 2, exactly one stderr line
``dopd <command>: error: ...`` naming the flag (and the valid values), no output directory.
Also: the temperature rule, local paths that never reach the Hub, ``--debug``, ``dopd eval --dtype``.
"""

import json
import os

import pytest
import torch
import transformers as tf

from dopd.cli import main
from dopd.config import ConfigError, TrainConfig
from dopd.modeling import looks_local
from dopd.preflight import check_flags, check_run, route_config


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if any model weights load (the checks must come first)."""
    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded")

    monkeypatch.setattr(tf.AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.fixture
def pair(tmp_path):
    """Student and teacher directories with config.json and a tokenizer only (no weights), and data."""
    from dopd.tasks.tokenizer import build_char_tokenizer

    paths = {}
    for name in ("student", "teacher"):
        path = str(tmp_path / name)
        tf.LlamaConfig(vocab_size=64, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                       num_attention_heads=1).save_pretrained(path)
        build_char_tokenizer().save_pretrained(path)
        paths[name] = path
    paths["data"] = str(tmp_path / "train.jsonl")
    with open(paths["data"], "w") as fh:
        fh.write(json.dumps({"prompt": "1+2", "privileged": "hint: 3"}) + "\n")
    paths["out"] = str(tmp_path / "out")
    return paths


def _train_args(pair, *extra):
    return ["train", "--student", pair["student"], "--teacher", pair["teacher"], "--data", pair["data"],
            "--output-dir", pair["out"], *extra]


def _one_error_line(capsys, command):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"dopd {command}: error: "), err[0]
    assert "Traceback" not in err[0]
    return err[0]


def _write_eval(tmp_path, with_answers):
    path = tmp_path / "eval.jsonl"
    row = {"prompt": "1+2", **({"answer": "3"} if with_answers else {})}
    path.write_text(json.dumps(row) + "\n")
    return str(path)


TRAIN_CASES = {
    "unknown loss key": (["--loss", "topk=64"], ["--loss topk=64", "unknown loss option", "top_k"]),
    "loss value": (["--loss", "top_k=0"], ["--loss top_k=0", "top_k must be"]),
    "loss temperature": (["--loss", "temperature=0"], ["--loss temperature=0", "temperature"]),
    "loss CE without labels": (["--loss", "ce_weight=0.5"], ["--loss ce_weight=0.5", "hard labels"]),
    "backend name": (["--loss-backend", "foo"], ["--loss-backend foo", "auto, torch, reference, triton"]),
    "device name": (["--device", "gpu"], ["--device gpu", "auto, cpu, cuda"]),
    "loss chunk size": (["--loss", "chunk_size=0"], ["--loss chunk_size=0", "chunk_size"]),
    "missing student": (["--student", "./no/such/model"], ["--student ./no/such/model", "no such directory"]),
    "missing data": (["--data", "missing.jsonl"], ["--data", "not found"]),
    "teacher not a causal LM": (["--teacher", "T5"], ["--teacher", "not a causal language model"]),
    "eval data without answers": (["--eval-data", "NOANSWER"], ["--eval-data", "answer"]),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_bad_train_inputs(pair, tmp_path, capsys, no_weights, case):
    extra, wanted = TRAIN_CASES[case]
    extra = list(extra)
    if "T5" in extra:
        tf.T5Config(vocab_size=64).save_pretrained(tmp_path / "t5")
        extra[extra.index("T5")] = str(tmp_path / "t5")
    if "NOANSWER" in extra:
        extra[extra.index("NOANSWER")] = _write_eval(tmp_path, with_answers=False)
    assert main(_train_args(pair, *extra)) == 2
    line = _one_error_line(capsys, "train")
    for text in wanted:
        assert text in line, (text, line)
    assert not os.path.exists(pair["out"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's answer")
def test_cuda_flags_without_a_gpu(pair, capsys, no_weights, monkeypatch):
    assert main(_train_args(pair, "--device", "cuda")) == 2
    assert "--device cuda: CUDA is not available" in _one_error_line(capsys, "train")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the test suite's interpreter mode runs it on CPU
    assert main(_train_args(pair, "--loss-backend", "triton")) == 2
    line = _one_error_line(capsys, "train")
    assert "--loss-backend triton needs a CUDA device" in line and "auto, torch, reference" in line
    assert not os.path.exists(pair["out"])


def test_embedded_task_checks_flags_before_training_its_teacher(tmp_path, capsys, monkeypatch):
    from dopd.tasks.base import BuiltinTask

    monkeypatch.setattr(BuiltinTask, "prepare", lambda *a, **k: pytest.fail("the teacher was prepared"))
    out = tmp_path / "run"
    assert main(["train", "--loss", "topk=64", "--output-dir", str(out), "--cache-dir", str(tmp_path / "c")]) == 2
    assert "--loss topk=64" in _one_error_line(capsys, "train")
    assert not out.exists()


def test_debug_shows_the_traceback(pair, no_weights):
    with pytest.raises(ConfigError, match="--loss-backend foo"):
        main(_train_args(pair, "--loss-backend", "foo", "--debug"))


def test_bad_dtype_is_an_argparse_error(pair, capsys):
    for argv in (_train_args(pair, "--dtype", "bf16"), ["eval", "--model", "m", "--data", "d", "--dtype", "fp8"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        assert "invalid choice" in capsys.readouterr().err


def test_local_paths_never_wait_for_the_hub(tmp_path, capsys, monkeypatch, no_weights):
    monkeypatch.setattr(tf.AutoConfig, "from_pretrained", lambda *a, **k: pytest.fail("asked the Hub"))
    monkeypatch.setattr(tf.AutoTokenizer, "from_pretrained", lambda *a, **k: pytest.fail("asked the Hub"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    data = _write_eval(tmp_path, with_answers=True)
    for model in ("runs/nonexistent", "./x", str(tmp_path / "a" / "b"), "runs/x/checkpoint-2"):
        assert main(["eval", "--model", model, "--data", data]) == 2
        line = _one_error_line(capsys, "eval")
        assert f"--model {model}: no such directory" in line


def test_looks_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for path in ("/abs/model", "./m", "../m", "~/m", "runs/x", "a/b/c", "a\\b"):
        assert looks_local(path), path
    for hub_id in ("gpt2", "Qwen/Qwen2.5-0.5B", "meta-llama/Llama-3.2-1B"):
        assert not looks_local(hub_id), hub_id


@pytest.mark.parametrize("argv, wanted", [
    (["--data", "NOANSWER"], ["--data", "answer"]),
    (["--device", "cuda:7"], ["--device cuda:7"]),
    (["--limit", "-1"], ["--limit"]),
])
def test_bad_eval_inputs(tmp_path, pair, capsys, no_weights, argv, wanted):
    argv = [_write_eval(tmp_path, with_answers=False) if a == "NOANSWER" else a for a in argv]
    if "--data" not in argv:
        argv += ["--data", _write_eval(tmp_path, with_answers=True)]
    out = tmp_path / "result.json"
    assert main(["eval", "--model", pair["student"], "--output", str(out), *argv]) == 2
    line = _one_error_line(capsys, "eval")
    for text in wanted:
        assert text in line, (text, line)
    assert not out.exists()


def test_eval_dtype_loads_the_model_in_that_dtype(tmp_path, capsys, monkeypatch):
    from dopd.tasks.tokenizer import build_char_tokenizer
    import dopd.modeling as modeling

    path = str(tmp_path / "m")
    tok = build_char_tokenizer()
    tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, pad_token_id=0, bos_token_id=1,
                                       eos_token_id=2)).save_pretrained(path)
    tok.save_pretrained(path)
    loaded = []
    real = modeling.load_causal_lm
    monkeypatch.setattr(modeling, "load_causal_lm", lambda *a, **k: loaded.append(real(*a, **k)) or loaded[-1])
    out = tmp_path / "r.json"
    rc = main(["eval", "--model", path, "--data", _write_eval(tmp_path, True), "--dtype", "bfloat16",
               "--max-new-tokens", "3", "--output", str(out)])
    assert rc == 0 and json.loads(out.read_text())["n"] == 1
    assert {p.dtype for p in loaded[0].parameters()} == {torch.bfloat16}


def test_loss_temperature_follows_sampling_temperature(pair):
    # The rule: the loss and routing use --temperature unless --loss temperature=... is given.
    assert route_config(TrainConfig()).temperature == 1.0
    cfg = TrainConfig(student=pair["student"], teacher=pair["teacher"], data=pair["data"], temperature=0.7)
    assert route_config(cfg).temperature == 0.7
    assert check_run(cfg).loss_config.temperature == 0.7  # what the trainer hands to routed_loss
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # equal temperatures: no warning
        check_flags(cfg)
    explicit = TrainConfig(temperature=0.7, loss={"temperature": 1.0})
    with pytest.warns(UserWarning, match="temperature 1.0 .* --temperature 0.7"):
        flags = check_flags(explicit)
    assert flags.loss_config.temperature == 1.0


def test_temperature_warning_is_one_cli_line(pair, capsys, monkeypatch):
    import dopd.trainer as trainer_mod
    from dopd.modeling import CompatibilityError

    def stop(*a, **k):
        raise CompatibilityError("stop here")

    monkeypatch.setattr(trainer_mod, "load_causal_lm", stop)
    assert main(_train_args(pair, "--temperature", "0.7", "--loss", "temperature=1.0")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("dopd train: warning: the loss and routing use temperature 1.0")
    assert err[-1] == "dopd train: error: stop here"
