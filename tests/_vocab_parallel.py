"""Multi-process harness of the vocabulary-parallel tests: gloo processes with a deadline, and their workers.

``run_ranks`` spawns ``world`` processes, joins them with a deadline (a hang, e.g. a collective one rank
never joins, fails the test instead of stalling the suite: the processes are killed) and returns what each
rank's worker returned. Workers compare the sharded loss with the single-process loss themselves (every
rank holds the whole weights too) and return errors and fingerprints, which the tests assert on.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from typing import Any, Callable, Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dopd.distributed import leave_process_group

from _inputs import make_inputs, rel_err
from _launch_guard import record_launch_guards, unguarded

FIELDS = ("per_token_loss", "adv_gap", "q_self", "q_teacher", "student_logprob")


def _entry(rank: int, worker: Callable, world: int, tmp: str, args: tuple) -> None:
    torch.set_num_threads(1)  # 2 to 4 processes share 2 cores
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'init')}", rank=rank, world_size=world)
    try:
        result = worker(rank, world, *args)
        torch.save(result, os.path.join(tmp, f"rank{rank}.pt"))
    except BaseException:
        dist.destroy_process_group()  # a failed rank just leaves (the others fail in their collectives)
        raise
    leave_process_group()  # together: no rank closes its connections while a peer still uses them


def run_ranks(worker: Callable, world: int, *args: Any, timeout: float = 240.0) -> list[Any]:
    """Run ``worker(rank, world, *args)`` on ``world`` gloo processes; returns their results in rank order."""
    with tempfile.TemporaryDirectory(prefix="dopd-vp-") as tmp:
        ctx = mp.start_processes(_entry, args=(worker, world, tmp, args), nprocs=world, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1.0):  # raises when a process failed (with its traceback)
            if time.monotonic() > deadline:
                for proc in ctx.processes:
                    if proc.is_alive():
                        proc.kill()
                pytest.fail(f"{world}-process run did not finish in {timeout:.0f} s (a hang?)")
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world)]


# --------------------------------------------------------------------------------------------- shards


def rows_of(x: Optional[torch.Tensor], sizes: list[int], rank: int) -> Optional[torch.Tensor]:
    """Rank ``rank``'s contiguous block of rows of ``x`` (None stays None)."""
    if x is None:
        return None
    lo = sum(sizes[:rank])
    return x[lo:lo + sizes[rank]]


def sharded_inputs(inp, sizes: list[int], rank: int) -> dict:
    """The shard-dependent arguments of rank ``rank``: the teacher's padding rows are cut before sharding."""
    vocab = sum(sizes)
    out = dict(student_weight=rows_of(inp.student_weight, sizes, rank),
               teacher_weight=rows_of(inp.teacher_weight[:vocab], sizes, rank),
               student_bias=rows_of(inp.student_bias, sizes, rank),
               teacher_bias=rows_of(None if inp.teacher_bias is None else inp.teacher_bias[:vocab], sizes, rank))
    for key in ("self_weight", "self_bias"):
        if inp.extra.get(key) is not None:
            out[key] = rows_of(inp.extra[key], sizes, rank)
    return out


def run_loss(inp, weights: dict, *, config, backend: str, group=None, module: bool = False, **options):
    """routed_loss (or the module) on fresh leaves; returns (output, d hidden, d weight, d bias)."""
    from dopd_kernels import RoutedDistillationLoss, routed_loss

    h = inp.student_hidden.detach().clone().requires_grad_()
    w = weights["student_weight"].detach().clone().requires_grad_()
    b = weights.get("student_bias")
    b = None if b is None else b.detach().clone().requires_grad_()
    kw = dict(student_bias=b, teacher_bias=weights.get("teacher_bias"), hard_labels=inp.hard_labels,
              self_weight=weights.get("self_weight"), self_bias=weights.get("self_bias"), **options)
    args = (h, w, inp.teacher_hidden, weights["teacher_weight"], inp.self_hidden, inp.target_ids, inp.mask)
    if module:
        fn = RoutedDistillationLoss(config, backend=backend, vocab_group=group)
        out = fn(*args, **kw)
    else:
        out = routed_loss(*args, config=config, backend=backend, vocab_group=group, **kw)
    if out.loss.requires_grad:
        out.loss.backward()
    return out, h.grad, w.grad, None if b is None else b.grad


def compare(out, ref, grads, ref_grads, sizes: list[int], rank: int) -> dict[str, float]:
    """Relative errors of every field, the metrics and the gradients (weights: the shard's rows of the full
    gradient); ``route`` is 0.0 when equal, 1.0 when not."""
    errors = {"route": 0.0 if torch.equal(out.route, ref.route) else 1.0, "loss": rel_err(out.loss, ref.loss)}
    for name in FIELDS:
        errors[name] = rel_err(getattr(out, name), getattr(ref, name))
    m, rm = out.metrics(include_logprob=True), ref.metrics(include_logprob=True)
    errors["metrics_keys"] = 0.0 if m.keys() == rm.keys() else 1.0
    errors["metrics"] = max((_metric_err(m[k], rm[k]) for k in rm if k in m), default=0.0)
    for name, g, rg in zip(("d_hidden", "d_weight", "d_bias"), grads, ref_grads):
        if rg is None:
            errors[name] = 0.0 if g is None else 1.0
            continue
        if g is None:
            errors[name] = float("inf")
            continue
        errors[name] = rel_err(g, rg if name == "d_hidden" else rows_of(rg, sizes, rank))
    return errors


def _metric_err(a: float, b: float) -> float:
    """Relative difference of two metrics; NaN in both (an empty batch's cutoffs) is no difference."""
    if math.isnan(a) and math.isnan(b):
        return 0.0
    err = abs(a - b) / max(1.0, abs(b))
    return err if err == err else float("inf")


def same_metrics(a: dict, b: dict) -> bool:
    """Bitwise-equal metrics (NaN equal to NaN)."""
    return a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


def fingerprint(out, grads) -> dict:
    """What must be equal on every rank (bitwise): loss, per-token fields, metrics, d hidden."""
    return dict(loss=out.loss.detach(), route=out.route, per_token=out.per_token_loss,
                logprob=out.student_logprob, metrics=out.metrics(), d_hidden=grads[0])


def problem(case: dict, vocab: int):
    """The inputs of a case: masked tokens, biases, a padded teacher vocabulary (3 rows), hard labels."""
    inp = make_inputs(lead=case.get("lead", (3, 11)), vocab=vocab, vt=vocab + 3, dtype=case.get("dtype", torch.float64),
                      hard_labels=True, mask_frac=case.get("mask_frac", 0.25), seed=case.get("seed", 0))
    if case.get("self_weight"):  # a privileged pass with its own projection (a frozen copy)
        g = torch.Generator().manual_seed(5)
        inp.extra["self_weight"] = inp.student_weight + 0.1 * torch.randn(inp.student_weight.shape, generator=g,
                                                                           dtype=inp.student_weight.dtype)
        inp.extra["self_bias"] = inp.student_bias - 0.2
    if case.get("masked_vocab"):  # -inf biases: K exceeds the finite count, the top-K cut falls among -inf ties
        mask_vocabulary(inp, vocab)
    return inp


#: A route table whose top-K routes read sources with -inf biases where the student is finite (fkl / jsd: the
#: student's mass on the ids picked at the cut counts, so the tie rule decides the loss).
MASKED_VOCAB_ROUTES = (("teacher", "fkl", "topk", 1.0), ("self", "jsd", "topk", 0.5), ("teacher", "jsd", "topk", 1.0),
                       ("self", "fkl", "topk", 0.7))


def mask_vocabulary(inp, vocab: int) -> None:
    """The teacher keeps ids 0..4 finite and a privileged self pass with its own head (the student's weights)
    ids 0..6; the student stays finite everywhere; the targets are ids 0..4 (finite under every model)."""
    inp.teacher_bias[5:vocab] = float("-inf")
    inp.extra["self_weight"] = inp.student_weight.clone()
    inp.extra["self_bias"] = inp.student_bias.clone()
    inp.extra["self_bias"][7:] = float("-inf")
    inp.target_ids = torch.where(inp.mask, inp.target_ids % 5, -100) if inp.mask is not None else inp.target_ids % 5


# -------------------------------------------------------------------------------------------- workers


def _whole(inp) -> dict:
    return dict(student_weight=inp.student_weight, teacher_weight=inp.teacher_weight, student_bias=inp.student_bias,
                teacher_bias=inp.teacher_bias, self_weight=inp.extra.get("self_weight"),
                self_bias=inp.extra.get("self_bias"))


def case_config(case: dict):
    """The case's RouteConfig: a preset, or a custom route table (``routes``), with ``config`` overrides."""
    from dopd_kernels import RouteConfig

    if "routes" in case:
        return RouteConfig(routes=case["routes"], **case.get("config", {}))
    return RouteConfig.preset(case["preset"], **case.get("config", {}))


def equivalence_worker(rank: int, world: int, sizes: list[int], cases: list[dict]) -> list[dict]:
    """Each case: the loss on this rank's shards vs one process on the whole weights (same backend).

    Case keys: preset, config (RouteConfig overrides), backend, dtype, transforms (routed_loss keywords),
    reduce_hidden_grad, module (use RoutedDistillationLoss), singleton (a group of this rank alone, whole
    weights), self_weight, mask_frac, lead, seed, masked_vocab (-inf biases), routes (a custom table),
    record_launches (Triton: note the device guard of every launch, ``_launch_guard.py``).
    """
    from dopd_kernels.vocab_parallel import comm

    singles = [dist.new_group([r]) for r in range(world)]  # every rank creates every group, in the same order
    results = []
    for case in cases:
        part_sizes, part_rank, group = (sizes, rank, dist.group.WORLD)
        if case.get("singleton"):
            part_sizes, part_rank, group = [sum(sizes)], 0, singles[rank]
        inp = problem(case, sum(sizes))
        config = case_config(case)
        backend = case.get("backend", "torch")
        options = dict(case.get("transforms", {}))
        ref = run_loss(inp, _whole(inp), config=config, backend=backend, **options)
        reduce = case.get("reduce_hidden_grad", True)
        comm.TRAFFIC.clear()
        with record_launch_guards() if case.get("record_launches") else contextlib.nullcontext() as launches:
            out = run_loss(inp, sharded_inputs(inp, part_sizes, part_rank), config=config, backend=backend,
                           group=group, module=case.get("module", False), reduce_hidden_grad=reduce, **options)
            traffic = dict(comm.TRAFFIC)  # the loss's own (bench/vocab_parallel.py predicts it)
            out[0].student_logprob  # the lazy pass: launches too
        grads = list(out[1:])
        extra = {}
        if not reduce:  # this shard's part only: the parts sum to the full gradient, and a part is not it
            extra["partial_vs_full"] = rel_err(grads[0], ref[1])
            grads[0] = grads[0].clone()
            dist.all_reduce(grads[0], group=group)
        errors = compare(out[0], ref[0], grads, ref[1:], part_sizes, part_rank)
        if launches is not None:
            extra["launches"] = [name for name, _, _ in launches]
            extra["unguarded"] = unguarded(launches)
        results.append(dict(errors=errors, extra=extra, traffic=traffic, fingerprint=fingerprint(out[0], grads),
                            route=out[0].route, hidden=inp.student_hidden.shape[-1],
                            n_valid=int((out[0].route >= 0).sum())))
    return results


def grid_worker(rank: int, world: int, sizes: list[int], cases: list[dict]) -> list[dict]:
    """2 data-parallel x 2 vocabulary-parallel ranks (rank = 2 dp + tp): each data-parallel replica holds half
    the sequences, each vocabulary rank half the rows; vs one process on the whole batch and weights."""
    from dopd_kernels.routing import route_tokens

    tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    dp, tp = divmod(rank, 2)
    results = []
    for case in cases:
        inp = problem(case, sum(sizes))
        config = case_config(case)
        whole = run_loss(inp, _whole(inp), config=config, backend="torch")
        half = slice(dp * inp.target_ids.shape[0] // 2, (dp + 1) * inp.target_ids.shape[0] // 2)
        for name in ("student_hidden", "teacher_hidden", "self_hidden", "target_ids", "mask", "hard_labels"):
            setattr(inp, name, getattr(inp, name)[half])
        out = run_loss(inp, sharded_inputs(inp, sizes, tp), config=config.replace(stats_group=dp_groups[tp]),
                       backend="torch", group=tp_groups[dp])
        res, ref = out[0], whole[0]
        factor = 2.0 if config.reduction == "seq_mean" else 1.0  # each replica averages over its half
        errors = {"route": 0.0 if torch.equal(res.route, ref.route[half]) else 1.0}
        for name in FIELDS:
            errors[name] = rel_err(getattr(res, name), getattr(ref, name)[half])
        errors["thresholds"] = max(rel_err(res.thresholds[k], ref.thresholds[k]) for k in ref.thresholds)
        loss = res.loss.detach().clone() / factor
        dist.all_reduce(loss, group=dp_groups[tp])
        errors["loss"] = rel_err(loss, ref.loss)
        errors["d_hidden"] = rel_err(out[1] / factor, whole[1][half])
        for i, name in ((2, "d_weight"), (3, "d_bias")):
            g = out[i] / factor
            dist.all_reduce(g, group=dp_groups[tp])
            errors[name] = rel_err(g, rows_of(whole[i], sizes, tp))
        # the replica's tokens alone would have given other thresholds: the pooling over dp is real
        alone = route_tokens(res.q_self.log(), res.q_teacher.log(), res.route >= 0, config)
        errors["alone_differs"] = float(any(not torch.allclose(alone.thresholds[k], ref.thresholds[k])
                                            for k in ref.thresholds))
        results.append(errors)
    return results


def bad_input_worker(rank: int, world: int, sizes: list[int], cases: list[str]) -> list[Optional[str]]:
    """Each case breaks one input (on one rank or on all); returns this rank's ValueError message (or None).
    The last entry is a valid call's loss, which shows that the ranks are still in step after the errors."""
    from dopd_kernels import RouteConfig

    vocab = sum(sizes)
    config = RouteConfig.preset("dopd", top_k=8, ce_weight=0.1)
    messages: list[Optional[str]] = []
    for case in cases:
        inp = problem({}, vocab)
        weights = sharded_inputs(inp, sizes, rank)
        if case == "teacher_shard_short" and rank == 1:
            weights["teacher_weight"] = weights["teacher_weight"][:-1]
            weights["teacher_bias"] = weights["teacher_bias"][:-1]
        elif case == "id_beyond_vocab":
            inp.target_ids = torch.where(inp.mask, inp.target_ids, 0)
            inp.target_ids[0, 0], inp.mask[0, 0] = vocab, True  # in no rank's shard
        elif case == "hard_label_beyond_vocab":
            inp.hard_labels[1, 2], inp.target_ids[1, 2], inp.mask[1, 2] = vocab + 5, 0, True
        elif case in ("student_hidden_differs", "self_hidden_differs", "teacher_hidden_differs") and rank == 1:
            name = case.removesuffix("_differs")
            x = getattr(inp, name).clone()
            valid_pos = inp.mask.nonzero()[0]
            x[valid_pos[0], valid_pos[1], 3] += 1e-3
            setattr(inp, name, x)
        elif case == "target_ids_differ" and rank == 1:
            pos = inp.mask.nonzero()[0]
            inp.target_ids[pos[0], pos[1]] = (inp.target_ids[pos[0], pos[1]] + 1) % vocab
        elif case == "bias_nan" and rank == 1:
            weights["student_bias"] = weights["student_bias"].clone()
            weights["student_bias"][2] = float("nan")
        elif case == "bias_missing" and rank == 0:
            weights["teacher_bias"] = None
        try:
            run_loss(inp, weights, config=config, backend="torch", group=dist.group.WORLD)
            messages.append(None)
        except ValueError as exc:
            messages.append(f"{type(exc).__name__}: {exc}")
    inp = problem({}, vocab)
    out = run_loss(inp, sharded_inputs(inp, sizes, rank), config=config, backend="torch", group=dist.group.WORLD)
    messages.append(float(out[0].loss))
    return messages


def trusted_layout_worker(rank: int, world: int, sizes: list[int]) -> list:
    """``check_values=False``: the shard sizes learnt by a group's first call, and what a later call whose
    shards changed does. Returns, per step, this rank's (ValueError message or relative loss error, elements
    this rank contributed to collectives); a step only some ranks take is run on those ranks alone (the
    others would rightly wait in the loss's collectives)."""
    from dopd_kernels import RouteConfig
    from dopd_kernels.vocab_parallel import comm

    trusted = RouteConfig.preset("dopd", top_k=8, ce_weight=0.1, check_values=False)
    other_group = dist.new_group(list(range(world)))  # every rank creates it, in the same order

    def step(shard_sizes, config=trusted, group=dist.group.WORLD, breaks=None):
        inp = problem({}, sum(shard_sizes))
        weights = sharded_inputs(inp, shard_sizes, rank)
        if breaks == "teacher_short":
            weights["teacher_weight"] = weights["teacher_weight"][:-1]
            weights["teacher_bias"] = weights["teacher_bias"][:-1]
        ref = run_loss(inp, _whole(inp), config=config, backend="torch")
        comm.TRAFFIC.clear()
        try:
            out = run_loss(inp, weights, config=config, backend="torch", group=group)
            result = rel_err(out[0].loss, ref[0].loss)
        except ValueError as exc:
            result = f"ValueError: {exc}"
        return result, sum(comm.TRAFFIC.values())

    moved = [sizes[0] + 1, sizes[1] - 1] + sizes[2:]  # every rank's own size changes
    shrunk = sizes[:-1] + [sizes[-1] - 1]  # only the last rank's does
    results = {"first": step(sizes), "again": step(sizes), "moved": step(moved)}
    if rank == world - 1:
        results["shrunk"] = step(shrunk)
        results["local_error"] = step(sizes, breaks="teacher_short")
    results["other_group"] = step(shrunk, group=other_group)  # a group's first call: exchanged, correct
    results["recheck"] = step(shrunk, config=trusted.replace(check_values=True))
    results["after_recheck"] = step(shrunk)
    return results
