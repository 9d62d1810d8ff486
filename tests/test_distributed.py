"""``dopd train`` on 2 CPU processes under torchrun (gloo), against 1 process on the union of their work.

- one optimizer step with fixed rollouts: gradients (clipped), parameters, loss and metrics on 2 ranks equal
  1 rank on the union of the rollouts, for ddp and fsdp, with a frozen, live and EMA self (the EMA's update
  too), seq_mean and token_mean;
- the same with tied embeddings (lm_head is embed_tokens; ddp and fsdp, frozen and EMA self): tied stays tied
  on both ranks, greedy rollouts after the step agree, and the checkpoint reloads with transformers, tied and
  with the 1-process logits; it resumes on one process;
- fp16 under FSDP2: an overflow in one rank's gradient shard skips the step on every rank;
- routes with global statistics equal the 1-rank routes on the union; with --local-routing-stats, each
  rank's equal 1-rank routes on its share;
- a non-finite loss on one rank stops every rank before the step, naming the rank;
- resume: 4 steps straight == 2 + resume + 2 (ddp, fsdp with an EMA self); a 2-rank checkpoint resumes on 1
  process, resharded;
- the README's commands (``torchrun --standalone --nproc_per_node 2 -m dopd train --task-size tiny ...``) for
  fsdp and ddp: exit 0, one metrics.jsonl with the route fields, a loadable checkpoint;
- a rank that fails, or hangs, stops both processes with a clear error within the timeout.
Every launch has a deadline: a hang fails the test (the process group is killed) instead of stalling the suite.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from dataclasses import replace

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _dist_common import (HERE, FixedRolloutTrainer, full_grads_and_params, greedy_responses,  # noqa: E402
                          step_config, tie_embeddings, torchrun, whole_params)

from dopd.tasks.default import default_task_config, prepare_default_task  # noqa: E402
from dopd.trainer import Trainer, batch_indices  # noqa: E402

pytestmark = pytest.mark.slow
TIMEOUT_S = 300  # per launch; a healthy one takes 20-30 s on a busy 2-core machine
WORKER = str(HERE / "dopd_dist_worker.py")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The embedded task at its tiny size, prepared once (the launches find it through DOPD_CACHE)."""
    root = tmp_path_factory.mktemp("dist")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = replace(default_task_config(size="tiny"), task_size="tiny", cache_dir=str(root / "cache"),
                  output_dir=str(root / "task"), progress=False, max_new_tokens=12)
    cfg, _ = prepare_default_task(cfg, log=lambda s: None)
    (root / "config.json").write_text(json.dumps(cfg.to_dict()))
    yield root, cfg
    torch.set_num_threads(threads)


def _launch(root, *args, timeout=TIMEOUT_S):
    return torchrun(list(args), timeout, cwd=str(root), env={"DOPD_CACHE": str(root / "cache")})


def _ranks(path, name):
    return [torch.load(path / f"{name}-rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.fixture(scope="module")
def tied(tiny):
    """The tiny task with tied-embedding models (lm_head is embed_tokens, as in Qwen3-0.6B, Gemma, Llama-3.2):
    its student and teacher re-saved with ``tie_word_embeddings=True``; (config file, TrainConfig)."""
    root, cfg = tiny
    cfg = replace(cfg, student=tie_embeddings(cfg.student, str(root / "tied-student")),
                  teacher=tie_embeddings(cfg.teacher, str(root / "tied-teacher")))
    path = root / "tied-config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    return path, cfg


@pytest.fixture(scope="module")
def two_ranks(tiny, tied):
    root, _ = tiny
    out = root / "step"
    out.mkdir()
    rc, output, _ = _launch(root, WORKER, "step", str(out), str(root / "config.json"), str(tied[0]))
    assert rc == 0, output[-6000:]
    return _ranks(out, "step")


def _one_process_step(trainer: FixedRolloutTrainer, every_name: bool = False) -> dict:
    """One step of a set-up trainer on one process: the gradients the optimizer saw, weights before and after."""
    start = full_grads_and_params(trainer, every_name)[1]
    seen = {}
    trainer.optimizer.register_step_pre_hook(
        lambda *_: seen.update(grads=full_grads_and_params(trainer, every_name)[0]))
    row = trainer.train_step()
    out = trainer.outputs[-1]
    return {"row": row, "grads": seen["grads"], "params": full_grads_and_params(trainer, every_name)[1],
            "route": out.route, "thresholds": out.thresholds, "trainer": trainer, "start": start,
            "ema": whole_params(trainer.self_ema.model, every_name) if trainer.self_ema is not None else None}


@pytest.fixture(scope="module")
def one_rank(tiny):
    """One process on the union of the two ranks' prompts and rollouts, for each variant (self model or reduction)."""
    root, cfg = tiny
    results = {}
    for variant in ("frozen", "live", "ema", "token_mean"):
        extra = {"loss": {"reduction": "token_mean"}} if variant == "token_mean" else {"self_model": variant}
        trainer = FixedRolloutTrainer(step_config(cfg, **extra, output_dir=str(root / f"one-{variant}")),
                                      log=lambda s: None)
        trainer.setup()
        if variant == "frozen":  # before the step: each rank's share routed on its own statistics
            idx = batch_indices(0, len(trainer.records), trainer.config.prompts_per_step, trainer.config.seed)
            with torch.no_grad():
                results["local"] = [trainer.micro_batch([trainer.records[i] for i in idx[r * 2: r * 2 + 2]])[0].route
                                    for r in (0, 1)]
        results[variant] = _one_process_step(trainer)
    return results


@pytest.fixture(scope="module")
def one_rank_tied(tiny, tied):
    """As ``one_rank`` with the tied-embedding models (frozen and EMA self), the tied head under both its names."""
    root, _ = tiny
    results = {}
    for variant in ("frozen", "ema"):
        run = step_config(tied[1], self_model=variant, output_dir=str(root / f"one-tied-{variant}"))
        trainer = FixedRolloutTrainer(run, log=lambda s: None)
        trainer.setup()
        results[variant] = _one_process_step(trainer, every_name=True)
        results[variant]["greedy"] = greedy_responses(trainer)
    return results


@pytest.mark.parametrize("variant", ["frozen", "live", "ema", "token_mean"])  # self model, or the token_mean reduction
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_rank_step_equals_one_rank_step_on_the_union(two_ranks, one_rank, parallel, variant):
    name = f"{parallel}-{variant}"
    _assert_same_step(one_rank[variant], two_ranks[0][name], two_ranks[1][name], parallel, variant)


def _assert_same_step(ref: dict, got: dict, other: dict, parallel: str, variant: str) -> None:
    """Rank 0's step (``got``) and rank 1's (``other``) equal one process's on the union (``ref``)."""
    assert got["grads"].keys() == ref["grads"].keys() == got["params"].keys()
    # The gradients the optimizer saw (after global clipping): a wrong normalization would be off by a factor.
    for name, g in ref["grads"].items():
        scale = float(g.abs().max())
        assert scale > 0, name  # every weight, the head included, receives a gradient
        err = float((got["grads"][name] - g).abs().max())
        assert err <= 1e-5 * scale, (name, err, scale)
    for name, p in ref["params"].items():
        torch.testing.assert_close(got["params"][name], p, rtol=0, atol=1e-6, msg=name)
    # rank 1 holds the same weights after the step (a replica that drifted, e.g. clipped by a local norm, fails)
    other = other["params"]
    assert other.keys() == got["params"].keys()
    for name, p in got["params"].items():
        assert torch.equal(other[name], p), name
    start = ref["start"]
    assert max(float((p - start[n]).abs().max()) for n, p in ref["params"].items()) > 2e-5  # the step moved them
    assert ref["row"]["grad_norm"] > 0.01  # clipping (max_grad_norm 0.01) was active: the global norm clipped
    for key in ("loss", "grad_norm", "n_tokens", "frac/HT", "frac/HS", "frac/LH", "frac/LL", "loss/HT",
                "student_entropy", "response_len", "adv_gap_mean"):
        assert got["row"][key] == pytest.approx(ref["row"][key], rel=1e-5, abs=1e-9), key
    if variant == "ema":  # the EMA self after its update from the stepped student (sharded like it under fsdp)
        assert got["ema"].keys() == ref["ema"].keys()
        for name, p in ref["ema"].items():
            torch.testing.assert_close(got["ema"][name], p, rtol=0, atol=1e-7, msg=name)
        assert any(not torch.equal(p, start[name]) for name, p in ref["ema"].items())
    if parallel == "fsdp":  # the student's head and the teacher's body are sharded; the teacher's head is whole
        vocab_s, vocab_t = ref["params"]["lm_head.weight"].shape[0], ref["trainer"].teacher.lm_head.weight.shape[0]
        assert got["layout"]["student_head_rows"] == vocab_s // 2
        assert got["layout"]["teacher_embed_rows"] == vocab_t // 2
        assert got["layout"]["teacher_head_rows"] == vocab_t


@pytest.mark.parametrize("variant", ["frozen", "ema"])
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_rank_step_with_tied_embeddings(two_ranks, one_rank_tied, parallel, variant):
    """lm_head is embed_tokens: under fsdp one shard serves both (in the root's FSDP group), the frozen
    teacher and self keep a whole head of their own, the EMA self's head follows the student's."""
    ref, name = one_rank_tied[variant], f"tied-{parallel}-{variant}"
    head, embed = "lm_head.weight", "model.embed_tokens.weight"
    assert {head, embed} <= ref["grads"].keys()  # the one gradient (embedding + head) under both names
    _assert_same_step(ref, two_ranks[0][name], two_ranks[1][name], parallel, variant)
    trained = ref["trainer"].student
    assert trained.get_output_embeddings().weight is trained.get_input_embeddings().weight
    for part in (r[name] for r in two_ranks):  # tied stays tied, on both ranks
        assert part["tied"] == {"same_tensor": True, "equal": True, "config": True}
        assert torch.equal(part["params"][head], part["params"][embed])
        if variant == "ema":  # (under fsdp the EMA's whole head is a copy of its sharded embedding: still equal)
            assert torch.equal(part["ema"][head], part["ema"][embed])
        assert torch.equal(part["greedy"], ref["greedy"])  # rollouts through the tied head, after the step


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_tied_checkpoint_reloads_tied_with_the_one_rank_logits(two_ranks, one_rank_tied, parallel):
    """The 2-rank checkpoint after the step (under fsdp: gathered from the shared shard by rank 0) is a
    transformers model with tied weights whose logits are the 1-process model's after the same step."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    for variant in ("frozen", "ema"):
        part, ref = two_ranks[0][f"tied-{parallel}-{variant}"], one_rank_tied[variant]
        model = AutoModelForCausalLM.from_pretrained(part["checkpoint"])
        assert model.config.tie_word_embeddings
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
        saved = dict(model.named_parameters(remove_duplicate=False))
        assert saved.keys() == part["params"].keys()
        with safe_open(os.path.join(part["checkpoint"], "model.safetensors"), "pt") as fh:
            assert set(fh.keys()) == set(saved) - {"lm_head.weight"}  # the head once, as save_pretrained writes it
        for name, p in saved.items():  # exactly what the ranks trained
            assert torch.equal(p.detach(), part["params"][name]), name
        trained = ref["trainer"].student
        ids = torch.randint(3, trained.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            got, want = model(input_ids=ids).logits, trained(input_ids=ids).logits
            before = AutoModelForCausalLM.from_pretrained(ref["trainer"].config.student)(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert float((want - before).abs().max()) > 1e-4  # the step changed the logits


def test_tied_fsdp_checkpoint_resumes_on_one_process(tiny, tied, two_ranks):
    """``--resume`` of the 2-rank fsdp checkpoint (EMA self) on one process: student and EMA self tied again,
    the tied parameter's AdamW state and the EMA's untied shards resharded exactly; then a step and a save."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    root, _ = tiny
    part, single = two_ranks[0]["tied-fsdp-ema"], root / "tied-resharded"
    shutil.copytree(part["checkpoint"], single / "checkpoint-1")
    trainer = Trainer(replace(tied[1], max_steps=2, eval_data=None, prompts_per_step=2, num_generations=2,
                              self_model="ema", output_dir=str(single), resume=True), log=lambda s: None)
    trainer.setup()
    assert trainer.step == 1
    student, ema = trainer.student, trainer.self_ema.model
    for model in (student, ema):
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    dcp_to_torch_save(single / "checkpoint-1" / "optimizer", single / "whole.pt")
    whole = torch.load(single / "whole.pt", weights_only=False)
    for name, p in student.named_parameters():
        state, saved = trainer.optimizer.state[p], whole["optimizer"]["state"][name]
        assert float(state["step"]) == 1
        assert torch.equal(state["exp_avg"], saved["exp_avg"]) and torch.equal(state["exp_avg_sq"], saved["exp_avg_sq"])
    for name, p in ema.named_parameters(remove_duplicate=False):  # what the ranks' EMA held after the step
        assert torch.equal(p, part["ema"][name]), name
    trainer.train()
    assert trainer.step == 2 and student.get_output_embeddings().weight is student.get_input_embeddings().weight


def test_global_routes_equal_one_rank_routes_on_the_union(two_ranks, one_rank):
    ref = one_rank["frozen"]
    for name in ("ddp-frozen", "fsdp-frozen", "fsdp-live"):
        parts = [r[name] for r in two_ranks]
        assert all(p["stats_group"] for p in parts)
        rows = 0
        for part in parts:  # rank r holds rows [r * B/2, (r + 1) * B/2) of the union, right-padded to its own width
            route = part["route"]
            assert torch.equal(route, ref["route"][rows: rows + route.shape[0], : route.shape[1]]), name
            assert (ref["route"][rows: rows + route.shape[0], route.shape[1]:] == -1).all()
            rows += route.shape[0]
            for key, value in ref["thresholds"].items():
                torch.testing.assert_close(part["thresholds"][key].double(), value.double(), rtol=1e-5, atol=1e-6)
        assert rows == ref["route"].shape[0]
    # --local-routing-stats: each rank routes its share on its own statistics, as one process would.
    for rank, part in enumerate(r["local"] for r in two_ranks):
        assert not part["stats_group"]
        assert torch.equal(part["route"], one_rank["local"][rank])
    assert any(not torch.equal(a["local"]["route"], a["ddp-frozen"]["route"][:, : a["local"]["route"].shape[1]])
               for a in two_ranks)  # and the global statistics really routed differently


def test_fp16_under_fsdp_an_overflow_on_one_rank_skips_the_step_on_all(two_ranks):
    for part in (r["fp16"] for r in two_ranks):  # rank 1 alone saw an inf in its gradient shard
        assert part["scaler"] == "ShardedGradScaler"
        assert part["unchanged"] and part["scale"] == (65536.0, 32768.0)  # skipped and backed off everywhere


def test_non_finite_loss_on_one_rank_stops_every_rank(two_ranks):
    for part in (r["nan"] for r in two_ranks):
        assert part["error"] == "non-finite loss at step 1 on rank(s) [1] of 2: nan"
        assert part["step"] == 0 and part["unchanged"]  # no optimizer step on any rank


def test_resume_on_two_ranks_and_resharded_on_one(tiny):
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    root, cfg = tiny
    out = root / "resume"
    out.mkdir()
    rc, output, _ = _launch(root, WORKER, "resume", str(out), str(root / "config.json"))
    assert rc == 0, output[-6000:]
    for parallel in ("ddp", "fsdp"):
        straight, resumed = out / parallel / "straight", out / parallel / "resumed"
        a, b = load_file(straight / "checkpoint-4" / "model.safetensors"), load_file(resumed / "checkpoint-4" / "model.safetensors")
        c = load_file(straight / "checkpoint-2" / "model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == torch.float32 and torch.equal(a[k], b[k]), (parallel, k)
        assert any(not torch.equal(a[k], c[k]) for k in a)  # steps 3-4 changed the student
        rows = [json.loads(line) for line in open(resumed / "metrics.jsonl")]
        assert [r["step"] for r in rows if "loss" in r] == [3, 4]
        assert sorted(os.listdir(straight / "checkpoint-4" / "rng")) == ["rank-0.pt", "rank-1.pt"]
    # The fsdp run's step-2 checkpoint on 1 process: the optimizer state resharded exactly, and said so.
    single = root / "resharded"
    shutil.copytree(out / "fsdp" / "straight" / "checkpoint-2", single / "checkpoint-2")
    logs = []
    trainer = Trainer(replace(cfg, max_steps=3, eval_data=None, grad_accum=2, prompts_per_step=2, num_generations=2,
                              self_model="ema", output_dir=str(single), resume=True), log=logs.append)
    trainer.setup()
    assert trainer.step == 2 and any("resuming a checkpoint of 2 rank(s) on 1" in line for line in logs)
    dcp_to_torch_save(single / "checkpoint-2" / "optimizer", single / "whole.pt")
    whole = torch.load(single / "whole.pt", weights_only=False)
    for name, p in trainer.student.named_parameters():
        state, saved = trainer.optimizer.state[p], whole["optimizer"]["state"][name]
        assert float(state["step"]) == 2
        assert torch.equal(state["exp_avg"], saved["exp_avg"]) and torch.equal(state["exp_avg_sq"], saved["exp_avg_sq"])
    assert trainer.scheduler.last_epoch == 2
    # The EMA self's shards, gathered onto one process: 2 updates behind, and not the student.
    student = load_file(out / "fsdp" / "straight" / "checkpoint-2" / "model.safetensors")
    assert trainer.self_ema.updates == 2
    for name, p in trainer.self_ema.model.state_dict().items():
        assert torch.equal(p, whole["self_ema"][name]), name
    assert any(not torch.equal(whole["self_ema"][k], v) for k, v in student.items())
    trainer.train()
    assert trainer.step == 3


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_readme_torchrun_command(tiny, parallel):
    from transformers import AutoModelForCausalLM

    root, cfg = tiny
    out = root / f"cli-{parallel}"
    # The README's command (section "Several GPUs"), on gloo; the tiny task's models come from DOPD_CACHE.
    readme = (HERE.parent / "README.md").read_text()
    line = next(line for line in readme.splitlines()
                if line.startswith("torchrun --standalone") and line.endswith(f"--parallel {parallel}"))
    argv = shlex.split(line.replace("DIR", str(out)))
    assert argv[:4] == ["torchrun", "--standalone", "--nproc_per_node", "2"]
    assert argv[4:8] == ["-m", "dopd", "train", "--task-size"]
    rc, output, _ = _launch(root, *argv[4:])
    assert rc == 0, output[-6000:]
    assert output.count("checkpoint: ") == 1 and output.count("student accuracy (dopd):") == 1  # rank 0 speaks
    found = [os.path.join(d, f) for d, _, files in os.walk(out) for f in files if f == "metrics.jsonl"]
    assert found == [str(out / "metrics.jsonl")]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    run = json.load(open(out / "config.json"))
    responses = run["prompts_per_step"] * run["num_generations"]  # over both ranks
    for row in train:
        assert abs(sum(row[f"frac/{k}"] for k in ("LH", "LL", "HT", "HS")) - 1) < 1e-9
        for key in ("loss/HT", "loss/HS", "threshold/adv_gap_bar", "tokens_per_s", "grad_norm", "student_entropy"):
            assert key in row, key
        assert row["n_tokens"] >= responses and row["response_len"] * responses == pytest.approx(row["n_tokens"])
    evals = [r["eval/n"] for r in rows if "eval/n" in r]
    assert len(evals) >= 2 and set(evals) == {8}  # the tiny held-out split, sharded over the ranks and gathered
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoint-2")
    initial = AutoModelForCausalLM.from_pretrained(run["student"])
    trained, start = model.state_dict(), initial.state_dict()
    assert trained.keys() == start.keys()
    assert all(trained[k].shape == start[k].shape for k in trained)
    assert any(not torch.equal(trained[k], start[k]) for k in trained)


def test_a_failing_rank_stops_every_rank(tiny):
    root, _ = tiny
    rc, output, _ = _launch(root, WORKER, "fail", "raise", "--", "--task-size", "tiny", "--max-steps", "2",
                            "--output-dir", "fail-raise", "--no-progress")
    assert rc != 0
    assert ("dopd train: error: rank 1 of 2: record 3: cannot render the prompt (simulated bad data on this rank)"
            in output), output[-4000:]
    assert "Traceback" not in output.split("dopd train: error: rank 1 of 2")[0]  # a data error: one line, no trace
    assert "ChildFailedError" in output  # torchrun stopped rank 0 or saw it fail: nothing is left running


def test_a_rank_that_stops_answering_times_out_readably(tiny):
    root, _ = tiny
    rc, output, seconds = _launch(root, WORKER, "fail", "hang", "--", "--task-size", "tiny", "--max-steps", "2",
                                  "--output-dir", "fail-hang", "--no-progress", "--dist-timeout", "30")
    assert rc != 0
    assert "dopd train: error: rank 0 of 2: a collective operation timed out" in output, output[-4000:]
    assert seconds < 240  # rank 1 sleeps 600 s: the timeout, not rank 1, ended the run
    # (30 s, not less: rank 1 waits for rank 0's set-up, e.g. the teacher's accuracy check, in a collective too)
