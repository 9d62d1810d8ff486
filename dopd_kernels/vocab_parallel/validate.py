"""Argument checks of the vocabulary-parallel loss, made collective: every rank raises, none hangs.

A rank that raised alone would leave the others waiting in the loss's first collective. So the local
checks (``validation.validate_hidden_inputs`` on the shard's metadata, the shard's own sizes and biases)
only record their error; one all-gather of a short float64 row per rank (error flags, shard size, shapes
and, with ``check_values``, checksums of the replicated inputs) then tells every rank how every other one
fared and the shard sizes. The rank at fault raises its own ValueError, the others one that names it.
The data-dependent checks of replicated inputs (finite hidden states, ids within the whole vocabulary)
run after the exchange: they fail on every rank alike.

Cost: with ``check_values`` (default) one all-gather and one host sync per call, plus ~4 passes over the
hidden states for the checksums; with ``check_values=False`` nothing after the first call on a group
(the shard sizes are remembered; a local metadata error then raises on its rank only).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..config import RouteConfig
from ..validation import check_values, validate_hidden_inputs
from .comm import all_gather
from .layout import MAX_VOCAB, ShardLayout, cached_sizes, remember_sizes

Tensor = torch.Tensor

#: Replicated inputs whose checksums are compared, and whether they hold integers (compared exactly).
REPLICATED = (("student_hidden", False), ("self_hidden", False), ("teacher_hidden", False), ("target_ids", True),
              ("mask", True), ("hard_labels", True))
#: Relative tolerance of the floating-point checksums (bitwise-replicated inputs agree exactly).
CHECKSUM_RTOL = 1e-7
#: Optional shard tensors: given on every rank or on none (a missing self_weight would change the model).
OPTIONAL = ("student_bias", "teacher_bias", "self_weight", "self_bias")
_HEAD = 7 + len(OPTIONAL)  # error flag, bias flag, V_r, N, Hs, Ht, d hidden wanted, which optional tensors
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def _group_place(group: Any) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("vocab_group: torch.distributed is not initialized")
    try:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
    except (RuntimeError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"vocab_group must be a torch.distributed process group: {exc}") from exc
    if rank < 0:
        raise ValueError("vocab_group: this process is not a member of the group")
    return rank, world


def _device(student_hidden: Any, group: Any) -> torch.device:
    if isinstance(student_hidden, Tensor):
        return student_hidden.device
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in str(dist.get_backend(group)) else \
        torch.device("cpu")


def _weights(n: int, device: torch.device) -> Tensor:
    """Fixed pseudo-random weights in [1, 2): weighted sums see a permutation, a plain sum does not."""
    return torch.arange(n, dtype=torch.float64, device=device).mul_(_GOLDEN).frac_().add_(1.0)


def checksum(x: Optional[Tensor], valid: Tensor) -> Tensor:
    """(4,) float64: sum, row-weighted sum, column-weighted sum and absolute sum of ``x``'s valid rows."""
    if x is None:
        return torch.zeros(4, dtype=torch.float64, device=valid.device)
    flat_valid = valid.reshape(-1)
    rows = x.detach().reshape(flat_valid.numel(), -1)
    if not rows.is_floating_point():
        rows = rows.to(torch.float64)
    per_row = torch.stack([rows.sum(1, dtype=torch.float64),
                           (rows * _weights(rows.shape[1], rows.device).to(rows.dtype)).sum(1, dtype=torch.float64),
                           rows.abs().sum(1, dtype=torch.float64)])
    per_row = torch.where(flat_valid, per_row, 0.0)  # masked rows may hold anything (NaN, -100)
    return torch.stack([per_row[0].sum(), (per_row[0] * _weights(rows.shape[0], rows.device)).sum(),
                        per_row[1].sum(), per_row[2].sum()])


def validate_sharded(student_hidden, student_weight, teacher_hidden, teacher_weight, self_hidden, target_ids, mask,
                     student_bias, teacher_bias, self_weight, self_bias, hard_labels, config: RouteConfig,
                     group: Any) -> tuple[Tensor, ShardLayout]:
    """Validate one rank's arguments of ``routed_loss(..., vocab_group=group)``; returns (valid mask, layout).

    Raises ValueError on every rank of the group when any rank's input is bad (see the module docstring).
    """
    rank, world = _group_place(group)
    error: Optional[ValueError] = None
    valid = None
    try:
        valid = validate_hidden_inputs(
            student_hidden, student_weight, teacher_hidden, teacher_weight, self_hidden, target_ids, mask,
            student_bias, teacher_bias, self_weight, self_bias, hard_labels, config.replace(check_values=False))
        if teacher_weight.shape[0] != student_weight.shape[0]:
            raise ValueError(
                f"teacher_weight: with vocab_group each rank passes the teacher's rows of its own student shard, "
                f"got {teacher_weight.shape[0]} teacher rows for {student_weight.shape[0]} student rows on rank "
                f"{rank} (cut the teacher's padding rows beyond the student's vocabulary before sharding)")
    except ValueError as exc:
        error = exc
    local = 0 if error is not None else student_weight.shape[0]
    if not config.check_values and error is None:
        sizes = cached_sizes(group, local)
        if sizes is not None and len(sizes) == world:
            return valid, ShardLayout(group, rank, world, sizes)
    device = _device(student_hidden, group)
    head = torch.zeros(_HEAD, dtype=torch.float64, device=device)
    parts = [head]
    bias_checks = []
    if error is not None:
        head[0] = 1.0
    else:
        # whether this rank will sum d hidden over the group: a rank that would not would leave the others waiting
        wants = torch.is_grad_enabled() and student_hidden.requires_grad
        given = [x is not None for x in (student_bias, teacher_bias, self_weight, self_bias)]
        head[2:] = torch.tensor([local, valid.numel(), student_weight.shape[1], teacher_weight.shape[1], wants,
                                 *given], dtype=torch.float64)
    if config.check_values:
        if error is None:
            # The shard's own biases (not replicated, so checked before the exchange): -inf allowed, NaN/+inf not.
            bias_checks = [(f"{name} has NaN or +inf values", (bias.detach() < float("inf")).all())
                           for name, bias in (("student_bias", student_bias), ("teacher_bias", teacher_bias),
                                              ("self_bias", self_bias)) if bias is not None]
            if bias_checks:
                head[1] = (~torch.stack([ok for _, ok in bias_checks]).all()).to(torch.float64)
            tensors = dict(student_hidden=student_hidden, self_hidden=self_hidden, teacher_hidden=teacher_hidden,
                           target_ids=target_ids, mask=mask, hard_labels=hard_labels)
            parts += [checksum(tensors[name], valid) for name, _ in REPLICATED]
        else:
            parts.append(torch.zeros(4 * len(REPLICATED), dtype=torch.float64, device=device))
    table = all_gather(torch.cat(parts), _layout_for_exchange(group, rank, world)).cpu()  # one host sync
    _raise_collectively(table, rank, error, bias_checks, config.check_values)
    sizes = tuple(int(v) for v in table[:, 2].tolist())
    if sum(sizes) >= MAX_VOCAB:
        raise ValueError(f"student_weight: the shards make a vocabulary of {sum(sizes)} rows; at most {MAX_VOCAB - 1}")
    remember_sizes(group, sizes, rank)
    layout = ShardLayout(group, rank, world, sizes)
    if config.check_values:  # replicated values (checked equal above): every rank passes or fails alike
        validate_hidden_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, self_hidden, target_ids,
                               mask, student_bias, teacher_bias, self_weight, self_bias, hard_labels, config,
                               vocab_size=layout.vocab)
    return valid, layout


def _layout_for_exchange(group: Any, rank: int, world: int) -> ShardLayout:
    return ShardLayout(group, rank, world, (1,) * world)  # only the group matters to all_gather


def _raise_collectively(table: Tensor, rank: int, error: Optional[ValueError], bias_checks: list,
                        with_values: bool) -> None:
    """Raise on this rank if any rank's row reports a problem, naming the argument (see the module doc)."""
    if error is not None:
        raise error
    bad = [r for r in range(table.shape[0]) if table[r, 0] != 0]
    if bad:
        raise ValueError(f"vocab_group: the arguments of rank(s) {bad} are invalid (the ValueError raised there "
                         "names the argument)")
    for col, name in ((3, "target_ids"), (4, "student_hidden"), (5, "teacher_hidden")):
        if not torch.all(table[:, col] == table[0, col]):
            raise ValueError(f"{name} must have the same shape on every rank of vocab_group (replicated); sizes "
                             f"{[int(v) for v in table[:, col].tolist()]} differ between ranks")
    if not torch.all(table[:, 6] == table[0, 6]):
        raise ValueError("student_hidden.requires_grad (and the grad mode) must be the same on every rank of "
                         "vocab_group: the gradient of the hidden states is summed over the group")
    for col, name in enumerate(OPTIONAL, 7):
        if not torch.all(table[:, col] == table[0, col]):
            raise ValueError(f"{name} must be given on every rank of vocab_group or on none")
    if not with_values:
        return
    if table[rank, 1] != 0:
        check_values(bias_checks)  # raises this rank's own message
    bad = [r for r in range(table.shape[0]) if table[r, 1] != 0]
    if bad:
        raise ValueError(f"vocab_group: the bias shards of rank(s) {bad} hold NaN or +inf values")
    for i, (name, exact) in enumerate(REPLICATED):
        sums = table[:, _HEAD + 4 * i:_HEAD + 4 * i + 4]
        scale = float(torch.nan_to_num(sums[:, 3].abs().max(), nan=0.0))  # NaN: the finite check reports it
        tol = 0.0 if exact else CHECKSUM_RTOL * scale
        same = torch.isclose(sums, sums[0:1].expand_as(sums), rtol=0.0, atol=tol, equal_nan=True).all()
        if not bool(same):
            raise ValueError(f"{name} differs between the ranks of vocab_group: it must be replicated (the same "
                             "on every rank)")
