"""What the loss needs from each model besides its hidden states: the output projection and its logit
post-processing (the trainer's reader, a superset of what TRL's ``DistillationTrainer`` reads); and the
data-parallel group.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from dopd_kernels import LogitTransform

Tensor = torch.Tensor


def logit_transform(model: Any) -> LogitTransform:
    """``LogitTransform(scale, softcap)`` of a model, read from its (text) config by the trainer's own reader.

    ``dopd.passes.logit_transform`` reads every setting TRL's loss reads (``logit_scale``,
    ``output_multiplier``, ``lm_head_multiplier``, ``logits_scaling``, ``final_logit_softcapping``, in TRL's
    order and meaning) and refuses, with a ValueError naming the model and setting, post-processing that
    a transform cannot reproduce exactly (MiniCPM's rescaled hidden states, MPT's ignored ``logit_scale``...).
    """
    from dopd.passes import logit_transform as from_config

    return from_config(model.config, name=type(model).__name__)


def head_params(model: Any, dtype: torch.dtype) -> tuple[Tensor, Optional[Tensor]]:
    """The output projection ``(weight (V, H), bias or None)`` as plain tensors of ``dtype``.

    Under FSDP2 the weight is a DTensor: ``full_tensor()`` gathers it once per step (its backward
    reduce-scatters the gradient), as TRL does for its own chunked loss. Under mixed precision the master
    weight is fp32 while the hidden states are bf16: the cast is what autocast does for the model's own
    ``lm_head`` matmul, and is differentiable, so the gradient still reaches the fp32 weight.
    """
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head)")
    weight, bias = head.weight, getattr(head, "bias", None)
    dtensor = getattr(torch.distributed, "tensor", None)
    if dtensor is not None and isinstance(weight, dtensor.DTensor):
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None else None
    return weight.to(dtype), (bias.to(dtype) if bias is not None else None)


def vocab_rows(model: Any) -> int:
    """Rows of the model's output projection: the vocabulary the loss sees (padding rows included)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head)")
    return int(head.weight.shape[0])


def data_parallel_group(accelerator: Any) -> Any:
    """The process group whose ranks hold different data: the routing statistics are pooled over it.

    None in one process. With accelerate's ``ParallelismConfig`` (TP/CP/HSDP meshes) the flattened ``dp``
    mesh dimension; without one, every process is a data-parallel rank (DDP, FSDP, DeepSpeed): the default group.
    """
    if accelerator.num_processes <= 1 or not torch.distributed.is_initialized():
        return None
    mesh = getattr(accelerator, "torch_device_mesh", None)
    config = getattr(accelerator, "parallelism_config", None)
    if mesh is not None and config is not None:
        if not config.dp_dim_names:
            return None  # no data parallelism: every rank sees the same batch
        return mesh["dp"].get_group()
    return torch.distributed.group.WORLD
