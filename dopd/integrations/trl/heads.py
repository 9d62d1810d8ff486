"""What the loss needs from each model besides its hidden states: the output projection and its logit
post-processing, read the way TRL's ``DistillationTrainer`` reads them; and the data-parallel group.

The logit transform belongs with the shared trainer code (issue 15 plans ``dopd.passes.logit_transform``);
until that lands it lives here, reading the same config attributes, in the same order, as TRL 1.16.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from dopd_kernels import LogitTransform

Tensor = torch.Tensor


def logit_transform(model: Any) -> LogitTransform:
    """``LogitTransform(scale, softcap)`` from a model's (text) config, as TRL's loss reads it.

    scale: ``logit_scale`` (Cohere), else ``output_multiplier``, else ``lm_head_multiplier`` (Falcon-H1),
    else ``1 / logits_scaling`` (Granite, MiniCPM3; HyperCLOVA X multiplies by it), else 1.
    softcap: ``final_logit_softcapping`` (Gemma 2), after the scale. A scale <= 0 is refused.
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scale = getattr(config, "logit_scale", None)
    if scale is None:
        scale = getattr(config, "output_multiplier", None)
    if scale is None:
        scale = getattr(config, "lm_head_multiplier", None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scaling = config.logits_scaling
        scale = scaling if getattr(config, "model_type", None) == "hyperclovax" else 1.0 / scaling
    softcap = getattr(config, "final_logit_softcapping", None)
    try:
        return LogitTransform(scale=1.0 if scale is None else float(scale),
                              softcap=None if softcap is None else float(softcap))
    except ValueError as err:
        raise ValueError(f"{type(model).__name__}: unsupported logit post-processing in its config: {err}") from None


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
