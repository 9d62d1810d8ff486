"""dopd compare: run specs, ablation tables, statistics and reports, failures kept, and the CLI end to end."""

import json
import math
import os

import pytest
import torch

from dopd.compare import ABLATIONS, RunSpec, parse_runs, run_one
from dopd.compare_report import markdown, mean_std, summarize
from dopd.config import ConfigError, TrainConfig, apply_overrides


def test_parse_runs_labels_seeds_and_self_models():
    specs = parse_runs(["dopd", "vanilla_opd"], [0, 1])
    assert [(s.label, s.seed) for s in specs] == [("dopd", 0), ("vanilla_opd", 0), ("dopd", 1), ("vanilla_opd", 1)]
    crossed = parse_runs(["dopd", "gkd", "sdpo@live"], [0], ["frozen", "ema"])
    assert [(s.label, s.self_model) for s in crossed] == [
        ("dopd@frozen", "frozen"), ("dopd@ema", "ema"), ("gkd", None), ("sdpo@live", "live")]
    abl = parse_runs(list(ABLATIONS), [0])
    assert [(s.preset, s.ablation) for s in abl] == [("dopd", r) for r in ("LH", "LL", "HT", "HS")]
    for bad, message in ((["nope"], "unknown run"), (["dopd@sometimes"], "self model"), (["dopd", "dopd"], "twice")):
        with pytest.raises(ConfigError, match=message):
            parse_runs(bad, [0])


@pytest.mark.parametrize("route", ["LH", "LL", "HT", "HS"])
def test_ablation_zeroes_one_route_weight(route):
    from dopd.trainer import route_config

    spec = RunSpec(f"dopd_no_{route}", "dopd", 0, ablation=route)
    rc = route_config(apply_overrides(TrainConfig(), spec.overrides()))
    full = route_config(TrainConfig())
    for rid, name in enumerate(("LH", "LL", "HT", "HS")):
        expect = 0.0 if name == route else full.route_weight(rid)
        assert rc.route_weight(rid) == expect
        assert (rc.routes[rid].source, rc.routes[rid].support) == (full.routes[rid].source, full.routes[rid].support)


def _fake_run(label, seed, after, status="ok"):
    run = {"label": label, "seed": seed, "name": f"{label}-seed{seed}", "status": status, "preset": label}
    if status != "ok":
        return {**run, "error": "RuntimeError: boom"}
    curve = [[0, 0.3], [10, after - 0.1], [20, after]]
    return {**run, "error": None, "accuracy_before": 0.3, "accuracy_after": after, "accuracy_over_steps": curve,
            "splits_after": {"heldout": after, "ood": after / 2, "prior": 0.5},
            "route_fractions": {"LH": 0.7, "LL": 0.1, "HT": 0.1, "HS": 0.1},
            "route_losses": {"LH": 0.1, "LL": 0.2, "HT": 0.3, "HS": 0.4}, "wall_s": 10.0, "cpu_s": 9.0}


def test_summary_statistics_and_markdown_keep_failures():
    runs = [_fake_run("dopd", 0, 0.7), _fake_run("dopd", 1, 0.8), _fake_run("dopd", 2, 0.0, status="failed"),
            _fake_run("vanilla_opd", 0, 0.5), _fake_run("vanilla_opd", 1, 0.52)]
    reference = {"teacher": {"heldout": 0.9}, "student_before": {"heldout": 0.3, "ood": 0.1, "prior": 0.8}}
    summary = summarize(runs, reference)
    d = summary["dopd"]
    assert (d["runs"], d["ok"], d["failed"]) == (3, 2, ["dopd-seed2"])
    assert d["after"][0] == pytest.approx(0.75) and d["after"][1] == pytest.approx(math.sqrt(0.005))
    assert d["heldout_after"] == d["after"] and d["gain"][0] == pytest.approx(0.45)
    assert d["forgetting"][0] == pytest.approx(0.3)
    assert d["curve"][-1][0] == 20 and d["curve"][-1][1] == pytest.approx(0.75)
    assert d["worst_drop"] == (0.0, 0.0) and summary["vanilla_opd"]["ood_after"][0] == pytest.approx(0.255)
    report = {"task": "digit_sum", "task_size": "tiny", "date": "2026-01-01T00:00:00", "jobs": 2, "wall_s": 60,
              "cpu_s": 50, "machine": {"processor": "x86_64", "cpus_usable": 2, "load_avg": [1.0, 1, 1],
                                       "load_avg_end": [2.0, 2, 2]},
              "config": {"max_steps": 20, "prompts_per_step": 2, "num_generations": 2, "learning_rate": 1e-3,
                         "self_model": "frozen"},
              "splits": {"heldout": 8}, "reference": reference, "runs": runs, "summary": summary}
    text = markdown(report)
    assert "| dopd | 2/3 | 0.750 ± 0.071 |" in text and "| vanilla_opd | 2/2 | 0.510 ± 0.014 |" in text
    assert "dopd-seed2: RuntimeError: boom" in text  # a failed run is listed, not dropped
    assert "- dopd: +0.240 (2 x std = 0.141; beyond the noise: yes)" in text
    assert all(math.isnan(v) for v in mean_std([])) and mean_std([0.5]) == (0.5, 0.0)


def test_a_failing_run_is_returned_as_failed(tmp_path):
    threads = torch.get_num_threads()
    cfg = {**TrainConfig().to_dict(), "student": str(tmp_path / "none"), "teacher": str(tmp_path / "none"),
           "data": str(tmp_path / "none.jsonl"), "output_dir": str(tmp_path / "run")}
    try:
        res = run_one(RunSpec("dopd", "dopd", 0), cfg, {})
    finally:
        torch.set_num_threads(threads)
    assert res["status"] == "failed" and "not found" in res["error"] and res["label"] == "dopd"


def test_compare_cli_tiny_writes_the_three_reports(tmp_path, monkeypatch, capsys):
    from dopd.cli import main

    monkeypatch.setenv("DOPD_CACHE", str(tmp_path / "cache"))  # never the user's ~/.cache/dopd
    out = tmp_path / "cmp"
    rc = main(["compare", "--task-size", "tiny", "--presets", "dopd,vanilla_opd", "--seeds", "1",
               "--output-dir", str(out)])
    assert rc == 0
    report = json.load(open(out / "compare.json"))
    assert report["task"] == "digit_sum" and report["splits"]["heldout"] == 8 and report["eval_split"] == "heldout"
    assert {r["label"] for r in report["runs"]} == {"dopd", "vanilla_opd"}
    for run in report["runs"]:
        assert run["status"] == "ok", run.get("error")
        assert run["preset"] in ("dopd", "vanilla_opd") and run["seed"] == 0
        assert 0 <= run["accuracy_before"] <= 1 and 0 <= run["accuracy_after"] <= 1
        assert [s for s, _ in run["accuracy_over_steps"]] == [0, 1, 2]
        assert set(run["route_fractions"]) == {"LH", "LL", "HT", "HS"}
        assert abs(sum(run["route_fractions"].values()) - 1) < 1e-6
        assert set(run["splits_after"]) == {"heldout", "ood", "prior"}
        assert os.path.isfile(os.path.join(run["output_dir"], "metrics.jsonl"))
    for label in ("dopd", "vanilla_opd"):
        entry = report["summary"][label]
        assert entry["ok"] == 1 and len(entry["heldout_after"]) == 2 and len(entry["after"]) == 2  # mean, std
    text = open(out / "compare.md").read()
    assert "heldout after" in text and "±" in text and "| dopd |" in text and "| vanilla_opd |" in text
    assert os.path.getsize(out / "compare.png") > 1000
    assert os.path.isfile(out / "data" / "train.jsonl") and os.path.isfile(out / "data" / "eval.jsonl")
    assert "| dopd |" in capsys.readouterr().out
