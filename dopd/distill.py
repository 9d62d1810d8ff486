"""The student's side of a micro-batch as one module: its rollouts, the live self pass, and the routed loss.

Data-parallel wrappers act at a module's forward: DDP arms its gradient all-reduce there, and FSDP2
gathers the root's sharded parameters (embeddings, final norm, lm_head) there. So everything the trainer
does with the student goes through :meth:`DistillModule.forward`, the same way with one process, DDP or
FSDP2:

- ``"generate"``: sampled (or greedy) responses. Under FSDP2 the decoder blocks are gathered once for the
  whole call (:func:`dopd.parallel.gathered_blocks`): ranks whose responses stop early must not skip the
  per-token all-gathers the others still make.
- ``"hidden"``: response-aligned last hidden states (the live privileged self, under no_grad).
- ``"loss"``: the student pass *and* :func:`dopd_kernels.routed_loss`, which reads the lm_head weight here,
  inside the forward, where FSDP2 has it unsharded; its gradient reaches the shards through FSDP2's
  reduce-scatter (DDP's all-reduce), like any other parameter's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from dopd.passes import PassBatch, output_projection, response_hidden
from dopd.precision import Precision
from dopd.rollout import Rollout, generate


@dataclass
class LossInputs:
    """What ``routed_loss`` needs besides the student's own pass: the other passes, targets and options."""

    teacher_hidden: torch.Tensor
    teacher_weight: torch.Tensor
    teacher_bias: Optional[torch.Tensor]
    self_hidden: torch.Tensor
    target_ids: torch.Tensor
    mask: torch.Tensor
    config: Any
    backend: str = "auto"
    self_weight: Optional[torch.Tensor] = None  # None: the live self, through the student's own lm_head
    self_bias: Optional[torch.Tensor] = None
    transforms: dict[str, Any] = field(default_factory=dict)  # routed_loss's *_transform keywords


class DistillModule(torch.nn.Module):
    """Wraps a causal LM ``student``; ``forward(mode, ...)`` is the student's whole part of a micro-batch.

    ``precision`` sets autocast for the passes and rollouts (off when ``autocast`` is False: FSDP2's
    MixedPrecisionPolicy casts instead) and the dtype the loss receives; None hands the loss the tensors
    as the model gives them.
    """

    def __init__(self, student: torch.nn.Module, precision: Optional[Precision] = None, autocast: bool = True):
        super().__init__()
        self.student = student
        self.precision = precision
        self.use_autocast = autocast

    def _autocast(self, device: torch.device) -> Any:
        return (self.precision or Precision()).autocast(device, enabled=self.use_autocast)

    def forward(self, mode: str, *args: Any, **kwargs: Any) -> Any:
        """``"generate"`` (tokenizer, prompts, **generate kwargs) -> Rollout; ``"hidden"`` (PassBatch) ->
        (B, R, H); ``"loss"`` (PassBatch, LossInputs) -> (loss, RoutedLossOutput)."""
        if mode == "generate":
            return self._generate(*args, **kwargs)
        if mode == "hidden":
            batch: PassBatch = args[0]
            with self._autocast(batch.input_ids.device):
                return response_hidden(self.student, batch)
        if mode == "loss":
            return self._loss(*args, **kwargs)
        raise ValueError(f"mode must be 'generate', 'hidden' or 'loss', got {mode!r}")

    def _generate(self, tokenizer: Any, prompts: Any, **kwargs: Any) -> Rollout:
        from dopd.parallel import gathered_blocks

        device = next(self.student.parameters()).device
        with gathered_blocks(self), self._autocast(device):
            return generate(self.student, tokenizer, prompts, **kwargs)

    def _loss(self, batch: PassBatch, inputs: LossInputs) -> tuple[torch.Tensor, Any]:
        from dopd_kernels import routed_loss

        cast = (lambda t: t) if self.precision is None else self.precision.loss_input
        with self._autocast(batch.input_ids.device):
            hidden = response_hidden(self.student, batch)
        # The loss gets everything in the compute dtype (a differentiable cast of the student's fp32 masters)
        # and runs outside autocast: it accumulates in fp32 itself, autocast would redo its GEMMs in bf16.
        weight, bias = output_projection(self.student)
        self_proj = {}
        if inputs.self_weight is not None:
            self_proj = {"self_weight": cast(inputs.self_weight), "self_bias": cast(inputs.self_bias)}
        out = routed_loss(cast(hidden), cast(weight), cast(inputs.teacher_hidden), cast(inputs.teacher_weight),
                          cast(inputs.self_hidden), inputs.target_ids, inputs.mask, student_bias=cast(bias),
                          teacher_bias=cast(inputs.teacher_bias), config=inputs.config, backend=inputs.backend,
                          **self_proj, **inputs.transforms)
        # The trainer logs the sampled-token entropy from it. The fused paths compute it lazily from the
        # student's head, which under FSDP2 is unsharded only inside this forward: compute it now.
        out.student_logprob  # noqa: B018
        return out.loss, out
