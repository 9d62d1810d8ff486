"""The vocabulary-parallel loss (``routed_loss(..., vocab_group=g)``) on 2, 3 and 4 gloo processes.

Every rank holds its shard of the vocabulary rows (uneven splits; the teacher's padding rows cut before
sharding) and compares what it gets with one process on the whole weights: every output field, the metrics,
d hidden (the full gradient, or the shards' parts summed when ``reduce_hidden_grad=False``) and the shard's
rows of d weight / d bias. Float64 at 1e-10 on the PyTorch path, float32 at 1e-4 under Triton's interpreter.
Each test runs many cases in one set of processes (spawning costs seconds) with a deadline (a hang fails).
"""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

from dopd_kernels import PRESETS, LogitTransform, RouteConfig, routed_loss

from _inputs import make_inputs
from _vocab_parallel import bad_input_worker, equivalence_worker, grid_worker, run_ranks, same_metrics

ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_vocab_parallel", ROOT / "bench" / "vocab_parallel.py")
bench_vp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_vp)

TORCH_TOL = 1e-10
TRITON_TOL = 1e-4
# K = 20 is larger than the smaller shards (15 rows of 37 on 2 ranks, 7 and 13 of 37 on 3).
PRESET_CASES = [dict(preset=p, config=dict(top_k=20, ce_weight=0.3)) for p in PRESETS]
SOFTCAP = dict(student_transform=LogitTransform(softcap=2.5), teacher_transform=LogitTransform(scale=1.7))
# Saturated soft-caps: 10 to 21 ids per row tie at the top, across the shards; the top-K must take the lowest.
SATURATED = dict(self_transform=LogitTransform(scale=40.0, softcap=0.5),
                 teacher_transform=LogitTransform(scale=40.0, softcap=0.5))


def _check(results_per_rank: list[list[dict]], cases: list[dict], tol: float, sizes: list[int]) -> None:
    """Every error within ``tol`` on every rank, and what must be equal on every rank bitwise equal."""
    for case_i, case in enumerate(cases):
        per_rank = [res[case_i] for res in results_per_rank]
        for rank, res in enumerate(per_rank):
            limit = case.get("tol", tol)
            exact = ("route", "metrics_keys")
            bad = {k: v for k, v in res["errors"].items() if not v <= (0.0 if k in exact else limit)}
            assert not bad, f"case {case}, rank {rank}: {bad}"
            if not case.get("reduce_hidden_grad", True):  # the op did not sum: one shard's part is not the whole
                assert res["extra"]["partial_vs_full"] > 1e-3, case
        first = per_rank[0]["fingerprint"]
        for rank, res in enumerate(per_rank[1:], 1):
            fp = res["fingerprint"]
            for key in ("loss", "route", "per_token", "logprob", "d_hidden"):
                if first[key] is not None or fp[key] is not None:
                    assert torch.equal(fp[key], first[key]), f"case {case}: {key} differs between ranks 0 and {rank}"
            assert same_metrics(fp["metrics"], first["metrics"]), f"case {case}: metrics differ between ranks"
        if case.get("backend", "torch") == "torch" and not case.get("singleton"):
            _check_traffic(per_rank[0], case, sizes)


def _check_traffic(res: dict, case: dict, sizes: list[int]) -> None:
    """The collectives' element counts are exactly bench/vocab_parallel.py's prediction."""
    config = RouteConfig.preset(case["preset"], **case.get("config", {}))
    counts = {rid: int((res["route"] == rid).sum()) for rid in range(4)}
    predicted = bench_vp.predicted_elements(counts, config, sizes, res["hidden"],
                                            reduce_hidden_grad=case.get("reduce_hidden_grad", True))
    assert res["traffic"] == predicted, f"case {case}: traffic {res['traffic']} != predicted {predicted}"


def test_two_ranks_uneven_shards_torch():
    sizes = [15, 22]
    cases = PRESET_CASES + [
        dict(preset="dopd", config=dict(top_k=8)),  # no CE
        dict(preset="dopd", config=dict(top_k=128, ce_weight=0.2)),  # K clipped to the whole vocabulary
        dict(preset="dopd", config=dict(top_k=20, chunk_size=4, temperature=1.3, reduction="token_mean")),
        dict(preset="dopd", config=dict(top_k=20), reduce_hidden_grad=False),
        dict(preset="gkd", config=dict(top_k=20, ce_weight=0.2), reduce_hidden_grad=False),
        dict(preset="dopd", config=dict(top_k=20, ce_weight=0.3), transforms=SOFTCAP),
        dict(preset="dopd", config=dict(top_k=8, ce_weight=0.3), transforms=SATURATED),
        dict(preset="vanilla_opd_sampled", config=dict(top_k=20), transforms=dict(
            student_transform=LogitTransform(scale=0.8), self_transform=LogitTransform(softcap=3.0))),
        dict(preset="dopd", config=dict(top_k=20, ce_weight=0.3), self_weight=True, module=True),
        dict(preset="dopd", config=dict(top_k=20, ce_weight=0.3), backend="reference"),
        dict(preset="sdpo", config=dict(top_k=20), backend="reference", reduce_hidden_grad=False,
             transforms=SOFTCAP),
        dict(preset="dopd", config=dict(top_k=20, ce_weight=0.3), singleton=True),  # a group of one rank
        dict(preset="dopd", config=dict(top_k=20), mask_frac=1.0),  # every token masked: loss 0, no NaN
        # bf16 shards (converted per block, fp32 compute) vs bf16 on one process: summation order only
        dict(preset="dopd", config=dict(top_k=20, ce_weight=0.3), dtype=torch.bfloat16, tol=1e-5),
    ]
    _check(run_ranks(equivalence_worker, 2, sizes, cases, timeout=300), cases, TORCH_TOL, sizes)


def test_three_ranks_uneven_shards_torch():
    sizes = [7, 17, 13]
    cases = PRESET_CASES + [
        dict(preset="dopd", config=dict(top_k=20, ce_weight=0.3), transforms=SOFTCAP, reduce_hidden_grad=False),
        dict(preset="opsd", config=dict(top_k=128, jsd_beta=0.3), self_weight=True),
        dict(preset="dopd", config=dict(top_k=16), transforms=SATURATED),
    ]
    _check(run_ranks(equivalence_worker, 3, sizes, cases, timeout=300), cases, TORCH_TOL, sizes)


@pytest.mark.parametrize("sizes", [[15, 22], [7, 17, 13]], ids=["2ranks", "3ranks"])
def test_triton_interpreter(sizes):
    pytest.importorskip("triton")
    small = dict(backend="triton", dtype=torch.float32, lead=(2, 7))
    presets = PRESETS if len(sizes) == 2 else ("dopd", "gkd", "vanilla_opd_sampled")
    cases = [dict(small, preset=p, config=dict(top_k=20, ce_weight=0.3)) for p in presets]
    cases.append(dict(small, preset="dopd", config=dict(top_k=20), reduce_hidden_grad=False))
    if len(sizes) == 2:  # logit transforms in the kernels' epilogues, per shard
        cases.append(dict(small, preset="dopd", config=dict(top_k=20, ce_weight=0.3), transforms=SOFTCAP))
        cases.append(dict(small, preset="gkd", config=dict(top_k=20), transforms=SOFTCAP))
    _check(run_ranks(equivalence_worker, len(sizes), sizes, cases, timeout=420), cases, TRITON_TOL, sizes)


def test_grid_of_two_data_parallel_by_two_vocabulary_parallel_ranks():
    sizes = [15, 22]
    cases = [dict(preset="dopd", lead=(4, 11), config=dict(top_k=20, ce_weight=0.3, reduction="sum")),
             dict(preset="gkd", lead=(4, 11), config=dict(top_k=20, reduction="seq_mean"))]
    results = run_ranks(grid_worker, 4, sizes, cases, timeout=300)
    for rank, per_case in enumerate(results):
        for case, errors in zip(cases, per_case):
            assert errors.pop("alone_differs") == 1.0, "the test would not see a missing data-parallel pooling"
            bad = {k: v for k, v in errors.items() if not v <= (0.0 if k == "route" else TORCH_TOL)}
            assert not bad, f"rank {rank}, case {case}: {bad}"


def test_bad_inputs_raise_on_every_rank():
    cases = ["teacher_shard_short", "id_beyond_vocab", "hard_label_beyond_vocab", "student_hidden_differs",
             "self_hidden_differs", "teacher_hidden_differs", "target_ids_differ", "bias_nan", "bias_missing"]
    results = run_ranks(bad_input_worker, 2, [15, 22], cases, timeout=240)
    expected = {  # case -> (rank 0's message, rank 1's message), substrings
        "teacher_shard_short": ("rank(s) [1]", "teacher_weight"),
        "id_beyond_vocab": ("target_ids out of range [0, 37)",) * 2,
        "hard_label_beyond_vocab": ("hard_labels out of range [0, 37)",) * 2,
        "student_hidden_differs": ("student_hidden differs",) * 2,
        "self_hidden_differs": ("self_hidden differs",) * 2,
        "teacher_hidden_differs": ("teacher_hidden differs",) * 2,
        "target_ids_differ": ("target_ids differs",) * 2,
        "bias_nan": ("rank(s) [1]", "student_bias has NaN"),
        "bias_missing": ("teacher_bias must be given on every rank",) * 2,
    }
    for i, case in enumerate(cases):
        for rank in range(2):
            message = results[rank][i]
            assert message is not None and expected[case][rank] in message, (case, rank, message)
            assert message.startswith("ValueError"), message
    assert results[0][-1] == results[1][-1]  # a valid call afterwards: the ranks are still in step


def test_arguments_checked_before_any_collective():
    inp = make_inputs()
    with pytest.raises(ValueError, match="reduce_hidden_grad"):
        routed_loss(*inp.args(), reduce_hidden_grad=1)
    import torch.distributed as dist

    if not dist.is_initialized():
        with pytest.raises(ValueError, match="vocab_group"):
            routed_loss(*inp.args(), vocab_group=object())
