"""The distributed plumbing's single-process parts: work division, devices under torchrun, the loss weight,
metrics without a process group, failure messages, the flags' help. (2-process runs: test_distributed.py.)"""

from __future__ import annotations

import re
import types

import pytest
import torch

from dopd.config import ConfigError, TrainConfig
from dopd.distributed import DistContext, failure_message, is_collective_failure, launched_by_torchrun, rank_device
from dopd.step_metrics import global_metrics, rank_loss_weight
from dopd.trainer import check_world

TWO = DistContext(rank=1, world_size=2, local_rank=1, group=object())  # a rank's view; no collective is called


def test_shares_are_contiguous_and_padded_shares_equal_in_length():
    items = list(range(8))
    assert [DistContext(r, 2, r, object()).share(items, "x") for r in (0, 1)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="prompts: 7 does not divide over 2 ranks"):
        TWO.share(items[:7], "prompts")
    # 5 eval records on 3 ranks: 2 + 2 + 1, the last padded to 2 calls' worth with a record it does not score
    got = [DistContext(r, 3, r, object()).padded_share(list("abcde")) for r in range(3)]
    assert got == [(["a", "b"], 2), (["c", "d"], 2), (["e", "a"], 1)]
    assert DistContext().share(items, "x") == items and DistContext().padded_share(items) == (items, 8)


def test_rank_seeds_keep_rank_zero_the_single_process_seed():
    assert DistContext().rank_seed(5) == 5 == DistContext(0, 4, 0, object()).rank_seed(5)
    assert len({DistContext(r, 4, r, object()).rank_seed(5) for r in range(4)}) == 4


def test_devices_under_torchrun(monkeypatch):
    assert rank_device("cuda:3", None) == "cuda:3"  # one process: unchanged (preflight checks it)
    assert rank_device("cpu", 1) == "cpu"
    with pytest.raises(ConfigError, match=r"--device cuda:1: under torchrun every rank takes cuda:LOCAL_RANK"):
        rank_device("cuda:1", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rank_device("auto", 1) == "cpu"
    with pytest.raises(ConfigError, match="LOCAL_RANK is 1 but this node has 0 CUDA device"):
        rank_device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert rank_device("auto", 1) == "cuda:1" and rank_device("cuda", 0) == "cuda:0"


def test_torchrun_is_recognized_by_its_environment(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert not launched_by_torchrun()
    monkeypatch.setenv("RANK", "0"), monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("LOCAL_RANK", "0")
    assert launched_by_torchrun()


def test_prompts_per_step_must_divide_over_the_ranks():
    check_world(TrainConfig(prompts_per_step=4), TWO)
    check_world(TrainConfig(prompts_per_step=3), DistContext())
    with pytest.raises(ConfigError, match=r"--prompts-per-step 3 must be a multiple of the 2 ranks"):
        check_world(TrainConfig(prompts_per_step=3), TWO)


class _Pretend(DistContext):
    """A rank whose all-reduce adds a fixed contribution of the other ranks (no process group needed)."""

    def __init__(self, rank, world, others):
        super().__init__(rank, world, rank, object())
        object.__setattr__(self, "others", others)

    def all_reduce(self, tensor, op="sum"):
        return tensor.add_(self.others.to(tensor))


def test_rank_loss_weights_average_to_the_union_normalization():
    # rank 0: 2 sequences with 3 + 1 valid tokens; rank 1: 2 sequences with 2 + 2 + (an empty row) tokens
    v0 = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    v1 = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    assert rank_loss_weight(v0, "seq_mean", DistContext()) == 1
    tok = [rank_loss_weight(v0, "token_mean", _Pretend(0, 2, torch.tensor(4.0))),
           rank_loss_weight(v1, "token_mean", _Pretend(1, 2, torch.tensor(4.0)))]
    assert [float(w) for w in tok] == [1.0, 1.0]  # 4 tokens each of 8: W * 4 / 8
    seq = [rank_loss_weight(v0, "seq_mean", _Pretend(0, 2, torch.tensor(2.0))),
           rank_loss_weight(v1, "seq_mean", _Pretend(1, 2, torch.tensor(2.0)))]
    assert [float(w) for w in seq] == [1.0, 1.0]  # rows with a valid token: 2 and 2 of 4
    uneven = rank_loss_weight(v0[:1], "token_mean", _Pretend(0, 2, torch.tensor(5.0)))
    assert float(uneven) == pytest.approx(2 * 3 / 8)
    assert float(rank_loss_weight(v0, "sum", _Pretend(0, 2, torch.tensor(0.0)))) == 2.0


def test_global_metrics_without_a_group_are_the_outputs_own():
    from dopd_kernels import RouteConfig, routed_loss

    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(3, 5, 8, generator=g), torch.randn(16, 8, generator=g)
    ids = torch.randint(0, 16, (3, 5), generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.3
    out = routed_loss(h, w, h + 0.1 * torch.randn(3, 5, 8, generator=g), w, h - 0.1, ids, mask,
                      config=RouteConfig.preset("dopd", top_k=4, chunk_size=4))
    mine, bad = global_metrics(out, torch.ones(()), DistContext(), torch.tensor([5.0, 2.0, 4.0]))
    theirs = out.metrics(include_logprob=True)
    assert bad == [] and set(theirs) <= set(mine)
    for key, value in theirs.items():
        assert mine[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    assert mine["response_len"] == pytest.approx(11 / 3)
    nan = types.SimpleNamespace(**{k: getattr(out, k) for k in ("route", "per_token_loss", "adv_gap", "q_self",
                                                                 "q_teacher", "student_logprob", "thresholds")},
                                loss=torch.tensor(float("nan")))
    assert global_metrics(nan, torch.ones(()), DistContext(), torch.ones(3))[1] == [0]


def test_failure_messages_name_the_rank():
    ctx = DistContext(0, 2, 0, object())
    timeout = RuntimeError("[/pytorch/third_party/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 5000ms")
    closed = RuntimeError("[../pair.cc:534] Connection closed by peer [127.0.0.1]:5432")
    assert is_collective_failure(timeout) and is_collective_failure(closed)
    assert not is_collective_failure(ValueError("Timed out"))
    assert failure_message(timeout, ctx).startswith("rank 0 of 2: a collective operation timed out (Timed out waiting")
    assert "another rank failed first" in failure_message(closed, ctx)
    assert failure_message(KeyError("x"), ctx) == "rank 0 of 2: KeyError: 'x'"


def test_every_train_flag_has_one_line_of_help_and_its_default_once(capsys):
    import dataclasses

    from dopd.cli import _parser
    from dopd.config_help import FIELD_HELP

    assert set(FIELD_HELP) == {f.name for f in dataclasses.fields(TrainConfig)}
    with pytest.raises(SystemExit):
        _parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    options = text.split("options:", 1)[1].split("\n\n", 1)[0]
    entries = [e.strip() for e in re.split(r"\n  (?=-)", options.strip("\n"))]  # one per flag (help lines wrap)
    for entry in entries:
        if entry.startswith(("-h", "--debug", "--config")):
            continue
        assert entry.count("(default:") == 1, entry
        assert "(default: None)" not in entry, entry
    assert len([e for e in entries if "(default:" in e]) == len(FIELD_HELP)
    assert "--parallel {ddp,fsdp}" in text and "--local-routing-stats" in text and "--dist-timeout" in text


def test_compare_refuses_torchrun(monkeypatch, tmp_path, capsys):
    from dopd.cli import main

    for key, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(key, value)
    assert main(["compare", "--output-dir", str(tmp_path / "c"), "--task-size", "tiny"]) == 2
    assert "dopd compare: error: dopd compare runs its jobs as separate processes" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
