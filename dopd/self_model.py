"""The privileged self pass's model: the live student, the frozen initial student, or an EMA of it.

``self_model`` (TrainConfig):
- ``live``: the student's current weights (the paper). The target moves with every update.
- ``frozen``: the initial student, never trained (an anchor: SDFT/OPSD-style).
- ``ema``: an exponential moving average of the student, ``self <- decay * self + (1 - decay) * student``
  after every optimizer step, starting from the initial student: a slow-moving target, the common
  fix for self-distillation drift (as BYOL/DINO-style teachers and EMA targets in RL do).
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import torch


class EmaSelf:
    """An EMA copy of a model's parameters (buffers are copied, not averaged); stop-gradient, eval mode."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """One EMA step toward ``model``'s current weights: ``e <- decay * e + (1 - decay) * w``.

        Parameters and buffers are matched by name. Under FSDP2 (``dopd.parallel``) the EMA's blocks are
        sharded like the student's (the step runs on each rank's shards) and its lm_head is whole where the
        student's is sharded: that one is gathered (``full_tensor``, a collective: every rank calls update).
        """
        from torch.distributed.tensor import DTensor

        theirs = dict(model.named_parameters(remove_duplicate=False))  # a tied head under both names
        for name, ema_p in self.model.named_parameters():
            p = theirs[name].detach()
            if isinstance(p, DTensor) and not isinstance(ema_p, DTensor):
                p = p.full_tensor()
            ema_p.lerp_(p.to(ema_p.dtype), 1.0 - self.decay)
        their_buffers = dict(model.named_buffers())
        for name, ema_b in self.model.named_buffers():
            ema_b.copy_(their_buffers[name])
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the averaged weights, the decay and the number of updates."""
        return {"weights": self.model.state_dict(), "decay": self.decay, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (on resume)."""
        self.model.load_state_dict(state["weights"])
        self.decay, self.updates = float(state["decay"]), int(state["updates"])


def make_self_model(kind: str, decay: float, student: torch.nn.Module,
                    load_initial: Callable[[], torch.nn.Module]) -> tuple[Optional[torch.nn.Module], Optional[EmaSelf]]:
    """``(model for the self pass or None for the live student, EmaSelf or None)`` for ``kind``.

    ``load_initial`` loads the initial student (frozen: also after ``--resume``, the self is the
    student the run started from).
    """
    if kind == "live":
        return None, None
    if kind == "frozen":
        return load_initial(), None
    if kind == "ema":
        ema = EmaSelf(student, decay)
        return ema.model, ema
    raise ValueError(f"self_model must be live, frozen or ema, got {kind!r}")
