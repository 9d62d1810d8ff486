"""DDP and FSDP2 around the trainer's models, and the few operations that change with them.

``--parallel ddp``: the student (inside :class:`dopd.distill.DistillModule`) is wrapped in
``DistributedDataParallel``; teacher and a frozen or EMA self are plain replicas in eval mode without gradients.

``--parallel fsdp``: FSDP2 (``fully_shard``) on every decoder block and then the root, for the student and
for the teacher and a frozen or EMA self (no gradients), with :meth:`dopd.precision.Precision.mp_policy` (compute
dtype parameters, fp32 gradient reduction), so that a teacher too large for one GPU fits across the ranks.
The student's root is the DistillModule, whose forward also runs the routed loss: its lm_head is unsharded
there. A frozen model's root is its transformer body; its lm_head stays whole on every rank (the loss
multiplies by it outside any forward: one V x H matrix per rank, the price of not gathering it per step).

A single process (no process group) uses neither wrapper: the same modules run as they are.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterable, Iterator

import torch

from dopd.config import PARALLEL
from dopd.distributed import DistContext
from dopd.passes import base_model
from dopd.precision import Precision



def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a transformers model: the classes it names in ``_no_split_modules`` (what
    accelerate wraps too), else the longest ``nn.ModuleList`` of its body."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in base_model(model).modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def _mesh(ctx: DistContext, device: torch.device) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (ctx.world_size,))


def wrap_student(module: torch.nn.Module, ctx: DistContext, parallel: str, device: torch.device,
                 precision: Precision) -> torch.nn.Module:
    """``module`` (a DistillModule) under DDP or FSDP2 (unchanged without a process group).

    FSDP2 moves the shards to ``device`` (load the student on the CPU first: no rank then holds it whole on
    the GPU); DDP expects the module on ``device`` already.
    """
    if not ctx.enabled:
        return module
    if parallel == "ddp":
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        # No buffer sync in forward: the buffers (rotary tables) are identical constants, and syncing them
        # would add a collective to every forward, generation's per-token forwards included. (torch 2.13
        # renamed the switch.) No device_ids: the inputs are on the device already.
        sync_off = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                    else "broadcast_buffers")
        return DistributedDataParallel(module, **{sync_off: False})
    if parallel != "fsdp":
        raise ValueError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
    from torch.distributed.fsdp import fully_shard

    mesh, policy = _mesh(ctx, device), precision.mp_policy()
    for block in decoder_blocks(module.student):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy)
    return module


def shard_frozen(model: torch.nn.Module, ctx: DistContext, parallel: str, device: torch.device,
                 precision: Precision) -> torch.nn.Module:
    """A frozen model (teacher, frozen self) for ``parallel``: FSDP2-sharded body and a whole lm_head on
    ``device`` under fsdp; as it is otherwise (it is already on ``device``)."""
    if not ctx.enabled or parallel != "fsdp":
        return model
    from torch.distributed.fsdp import fully_shard

    head = model.get_output_embeddings()
    body = base_model(model)
    if any(p is head.weight for p in body.parameters()):
        # Tied embeddings: the head keeps its own copy, whole, while the body's embedding is sharded.
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    mesh, policy = _mesh(ctx, device), precision.mp_policy()
    for block in decoder_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    # reshard_after_forward=True at the root too: nothing is ever gathered back for a backward pass.
    fully_shard(body, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    head.to(device)
    return model


def grad_scaler(precision: Precision, device: torch.device, ctx: DistContext, parallel: str) -> Any:
    """The fp16 loss scaler (disabled otherwise). Under FSDP2 each rank sees only its gradient shards, so it is
    ``ShardedGradScaler``, which all-reduces "a shard overflowed": every rank skips or takes the same steps."""
    if ctx.enabled and parallel == "fsdp" and precision.compute_dtype == torch.float16:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type, enabled=True, process_group=ctx.group)
    return precision.grad_scaler(device)


@contextlib.contextmanager
def gathered_blocks(root: torch.nn.Module) -> Iterator[None]:
    """Inside an FSDP2 root's forward: keep every inner FSDP2 module unsharded until the block ends.

    ``generate`` calls the blocks once per new token, and ranks stop at different lengths; gathering once
    up front means no collective runs per token (and no rank waits for one the others never make). A no-op
    without FSDP2.
    """
    from torch.distributed.fsdp import FSDPModule

    inner = [m for m in root.modules() if isinstance(m, FSDPModule) and m is not root]
    if not inner:
        yield
        return
    for m in inner:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in inner:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


def reshard(module: torch.nn.Module) -> None:
    """Put an FSDP2 root's parameters back into their shards (a no-op without FSDP2).

    FSDP2 leaves a root gathered after its forward, for the backward that follows in training. After a
    forward without one (evaluation's generation) the root's parameters (embeddings, final norm, lm_head) are
    still the whole tensors, not the DTensor shards the optimizer holds: a state dict taken then misses them
    (``get_optimizer_state_dict`` fails with ``KeyError: 0``).
    """
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module, FSDPModule):
        module.reshard()


def no_sync(module: torch.nn.Module, skip: bool) -> Any:
    """DDP's ``no_sync()`` when ``skip`` (a micro-batch before the last of a step), else a no-op context."""
    return module.no_sync() if skip and hasattr(module, "no_sync") else contextlib.nullcontext()


def clip_grad_norm(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the gradients to a global 2-norm of ``max_norm`` (0 or inf: measure only); return the norm.

    DTensor-aware: under FSDP2 each rank holds gradient shards, ``get_total_norm`` gives a partial norm as a
    DTensor, and ``full_tensor()`` reduces it over the ranks, so every rank clips by the same global norm.
    DDP's gradients are already all-reduced (the local norm is the global one).
    """
    from torch.distributed.tensor import DTensor

    params = [p for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if max_norm and math.isfinite(max_norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def full_state_dict(model: torch.nn.Module, ctx: DistContext) -> dict[str, torch.Tensor]:
    """The whole state dict of ``model`` on rank 0, on the CPU (gathered from the shards under FSDP2; every
    rank must call it); other ranks get an empty dict.

    A parameter the model holds under several names (a tied lm_head: ``lm_head.weight`` is
    ``model.embed_tokens.weight``) is one tensor under all of them, as in ``model.state_dict()``: the gather
    returns a separate copy per name, and ``save_pretrained`` recognizes tied weights by shared storage, so
    it would write the head twice (V x H more, in fp32: 0.6 GB for Qwen3-0.6B).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=ctx.enabled))
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in state:
            state[name] = state[first.setdefault(id(param), name)]
    return state
