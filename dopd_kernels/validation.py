"""Argument checks for the public entry points: every error is a ValueError naming the argument.

Shape, dtype and device checks read only metadata. Data-dependent checks (finite hidden states,
ids in range, a 0/1 mask) need the values: they are batched into one tensor and read with a single
host synchronisation, and ``RouteConfig(check_values=False)`` skips them (CUDA graphs, trusted inputs).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .config import RouteConfig

Tensor = torch.Tensor


def as_config(config) -> RouteConfig:
    """None -> defaults, a preset name -> that preset, a RouteConfig -> itself."""
    if config is None:
        return RouteConfig()
    if isinstance(config, str):
        return RouteConfig.preset(config)
    if not isinstance(config, RouteConfig):
        raise ValueError(f"config must be a RouteConfig, a preset name or None, got {type(config).__name__}")
    return config


def _tensor(name: str, x, *, floating: Optional[bool] = None, dims: Sequence[int] = ()) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating is True and not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if floating is False and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer tensor, got dtype {x.dtype}")
    if dims and x.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(x.shape)}")
    return x


def _same_device(named: dict[str, Optional[Tensor]]) -> None:
    present = {k: v for k, v in named.items() if v is not None}
    first_name, first = next(iter(present.items()))
    for name, t in present.items():
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def _mask_and_labels(target_ids: Tensor, mask, hard_labels, config: RouteConfig, vocab: int) -> Tensor:
    """Check target_ids / mask / hard_labels metadata; returns the mask as bool (all True if None)."""
    _tensor("target_ids", target_ids, floating=False)
    if mask is None:
        valid = torch.ones_like(target_ids, dtype=torch.bool)
    else:
        _tensor("mask", mask)
        if mask.shape != target_ids.shape:
            raise ValueError(f"mask must have the shape of target_ids {tuple(target_ids.shape)}, got {tuple(mask.shape)}")
        if mask.is_complex():
            raise ValueError(f"mask must be bool or 0/1, got dtype {mask.dtype}")
        valid = mask if mask.dtype == torch.bool else mask != 0
    if config.ce_weight > 0 and hard_labels is None:
        raise ValueError("hard_labels: required when config.ce_weight > 0")
    if hard_labels is not None:
        _tensor("hard_labels", hard_labels, floating=False)
        if hard_labels.shape != target_ids.shape:
            raise ValueError(
                f"hard_labels must have the shape of target_ids {tuple(target_ids.shape)}, got {tuple(hard_labels.shape)}"
            )
    return valid


def _below_posinf(x: Tensor) -> Tensor:
    """Elementwise: not NaN and not +inf (-inf is a masked vocabulary entry, which is allowed)."""
    return x < float("inf")


def check_values(checks: list[tuple[str, Tensor]]) -> None:
    """Raise a ValueError naming the first failing check; ``checks`` are (message, 0-d bool ok) pairs.

    One host synchronisation for all of them.
    """
    if not checks:
        return
    device = checks[0][1].device
    oks = torch.stack([ok.reshape(()).to(device) for _, ok in checks]).cpu().tolist()
    for (message, _), ok in zip(checks, oks):
        if not ok:
            raise ValueError(message)


def _value_checks(valid: Tensor, mask, target_ids: Tensor, hard_labels, vocab: int) -> list[tuple[str, Tensor]]:
    checks = []
    if mask is not None and mask.dtype != torch.bool:
        checks.append(("mask must hold only 0 and 1", ((mask == 0) | (mask == 1)).all()))
    in_range = (target_ids >= 0) & (target_ids < vocab)
    checks.append((f"target_ids out of range [0, {vocab}) at a valid position", (in_range | ~valid).all()))
    if hard_labels is not None:
        ok = (hard_labels >= 0) & (hard_labels < vocab)
        checks.append((f"hard_labels out of range [0, {vocab}) at a valid position", (ok | ~valid).all()))
    return checks


def validate_hidden_inputs(
    student_hidden, student_weight, teacher_hidden, teacher_weight, self_hidden, target_ids, mask,
    student_bias, teacher_bias, self_weight, self_bias, hard_labels, config: RouteConfig,
    vocab_size: Optional[int] = None,
) -> Tensor:
    """Validate ``routed_loss``'s arguments; returns the validity mask (bool, shaped like target_ids).

    ``vocab_size``: the range of the ids when the weights are one rank's vocabulary shard (the whole
    vocabulary's size); default: the student weight's rows.
    """
    _tensor("student_hidden", student_hidden, floating=True, dims=(2, 3))
    _tensor("student_weight", student_weight, floating=True, dims=(2,))
    _tensor("teacher_hidden", teacher_hidden, floating=True, dims=(2, 3))
    _tensor("teacher_weight", teacher_weight, floating=True, dims=(2,))
    _tensor("self_hidden", self_hidden, floating=True, dims=(2, 3))
    vocab, hs = student_weight.shape
    lead = tuple(student_hidden.shape[:-1])
    if student_hidden.shape[-1] != hs:
        raise ValueError(f"student_hidden's last dim {student_hidden.shape[-1]} != student_weight's Hs {hs}")
    if self_hidden.shape != student_hidden.shape:
        raise ValueError(f"self_hidden must have the shape of student_hidden {tuple(student_hidden.shape)}, got {tuple(self_hidden.shape)}")
    if tuple(teacher_hidden.shape[:-1]) != lead:
        raise ValueError(f"teacher_hidden's leading shape {tuple(teacher_hidden.shape[:-1])} != student_hidden's {lead}")
    if teacher_hidden.shape[-1] != teacher_weight.shape[1]:
        raise ValueError(f"teacher_hidden's last dim {teacher_hidden.shape[-1]} != teacher_weight's Ht {teacher_weight.shape[1]}")
    if teacher_weight.shape[0] < vocab:
        raise ValueError(f"teacher_weight has {teacher_weight.shape[0]} vocabulary rows, fewer than the student's V={vocab}")
    if vocab < 1:
        raise ValueError("student_weight must have at least one vocabulary row")
    for name, dtype in (("student_weight", student_weight.dtype), ("self_hidden", self_hidden.dtype)):
        if dtype != student_hidden.dtype:
            raise ValueError(f"{name} dtype {dtype} != student_hidden dtype {student_hidden.dtype}")
    if teacher_weight.dtype != teacher_hidden.dtype:
        raise ValueError(f"teacher_weight dtype {teacher_weight.dtype} != teacher_hidden dtype {teacher_hidden.dtype}")
    if self_weight is not None:
        _tensor("self_weight", self_weight, floating=True, dims=(2,))
        if tuple(self_weight.shape) != (vocab, hs):
            raise ValueError(f"self_weight must have shape {(vocab, hs)}, got {tuple(self_weight.shape)}")
    elif self_bias is not None:
        raise ValueError("self_bias: given without self_weight (the self pass uses student_bias then)")
    for name, bias, rows in (("student_bias", student_bias, vocab), ("teacher_bias", teacher_bias, teacher_weight.shape[0]),
                             ("self_bias", self_bias, vocab)):
        if bias is not None:
            _tensor(name, bias, floating=True, dims=(1,))
            if bias.shape[0] != rows:
                raise ValueError(f"{name} must have shape ({rows},), got {tuple(bias.shape)}")
    _tensor("target_ids", target_ids)
    if tuple(target_ids.shape) != lead:
        raise ValueError(f"target_ids must have the leading shape of the hidden states {lead}, got {tuple(target_ids.shape)}")
    if vocab_size is not None:  # a vocabulary shard: the ids index the whole vocabulary
        vocab = vocab_size
    valid = _mask_and_labels(target_ids, mask, hard_labels, config, vocab)
    _same_device({
        "student_hidden": student_hidden, "student_weight": student_weight, "teacher_hidden": teacher_hidden,
        "teacher_weight": teacher_weight, "self_hidden": self_hidden, "target_ids": target_ids, "mask": mask,
        "student_bias": student_bias, "teacher_bias": teacher_bias, "self_weight": self_weight,
        "self_bias": self_bias, "hard_labels": hard_labels,
    })
    if config.check_values:
        checks = _value_checks(valid, mask, target_ids, hard_labels, vocab)
        for name, h in (("student_hidden", student_hidden), ("self_hidden", self_hidden), ("teacher_hidden", teacher_hidden)):
            finite = torch.isfinite(h.detach()).all(-1) | ~valid
            checks.append((f"{name} has non-finite values at a valid position", finite.all()))
        # Biases are V-sized: cheap. -inf is allowed (a masked vocabulary entry), NaN and +inf are not.
        for name, bias in (("student_bias", student_bias), ("teacher_bias", teacher_bias), ("self_bias", self_bias)):
            if bias is not None:
                b = bias.detach()[:vocab]
                checks.append((f"{name} has NaN or +inf values", _below_posinf(b).all()))
        check_values(checks)
    return valid


def validate_logit_inputs(student_logits, teacher_logits, self_logits, target_ids, mask, hard_labels,
                          config: RouteConfig) -> Tensor:
    """Validate ``routed_loss_from_logits``'s arguments; returns the validity mask."""
    _tensor("student_logits", student_logits, floating=True, dims=(2, 3))
    _tensor("teacher_logits", teacher_logits, floating=True, dims=(2, 3))
    _tensor("self_logits", self_logits, floating=True, dims=(2, 3))
    vocab = student_logits.shape[-1]
    if self_logits.shape != student_logits.shape:
        raise ValueError(f"self_logits must have the shape of student_logits {tuple(student_logits.shape)}, got {tuple(self_logits.shape)}")
    if teacher_logits.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"teacher_logits' leading shape {tuple(teacher_logits.shape[:-1])} != student_logits' {tuple(student_logits.shape[:-1])}")
    if teacher_logits.shape[-1] < vocab:
        raise ValueError(f"teacher_logits has vocabulary {teacher_logits.shape[-1]}, smaller than the student's {vocab}")
    _tensor("target_ids", target_ids)
    if target_ids.shape != student_logits.shape[:-1]:
        raise ValueError(f"target_ids must have shape {tuple(student_logits.shape[:-1])}, got {tuple(target_ids.shape)}")
    valid = _mask_and_labels(target_ids, mask, hard_labels, config, vocab)
    _same_device({"student_logits": student_logits, "teacher_logits": teacher_logits, "self_logits": self_logits,
                  "target_ids": target_ids, "mask": mask, "hard_labels": hard_labels})
    if config.check_values:
        checks = _value_checks(valid, mask, target_ids, hard_labels, vocab)
        for name, z in (("student_logits", student_logits), ("self_logits", self_logits),
                        ("teacher_logits", teacher_logits[..., :vocab])):
            checks.append((f"{name} has NaN or +inf at a valid position",
                           (_below_posinf(z).all(-1) | ~valid).all()))
        check_values(checks)
    return valid
