"""The public entry points: argument checks, backend choice, and the nn.Module wrapper."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from .chunked import chunked_routed_loss
from .config import RouteConfig
from .output import RoutedLossOutput
from .reference import reference_from_logits, reference_routed_loss
from .selfcheck import CallShape, triton_agrees
from .transform import LogitTransform, as_transform
from .validation import as_config, validate_hidden_inputs, validate_logit_inputs

Tensor = torch.Tensor
BACKENDS = ("auto", "torch", "reference", "triton")


def _triton_available() -> bool:
    try:
        from .triton import triton_routed_loss  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_backend(backend: str, device: torch.device, config: Optional[RouteConfig] = None,
                     dtype: torch.dtype = torch.float32, call: CallShape = CallShape()) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        use = device.type == "cuda" and _triton_available()
        # Until the kernels have run on a GPU: a one-time comparison with the PyTorch path (selfcheck.py).
        return "triton" if use and triton_agrees(device, config or RouteConfig(), dtype, call) else "torch"
    if backend == "triton" and not _triton_available():
        raise ValueError("backend='triton' needs the 'kernels' extra: pip install 'dopd[kernels]'")
    return backend


def routed_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    self_hidden: Tensor,
    target_ids: Tensor,
    mask: Optional[Tensor] = None,
    *,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    self_weight: Optional[Tensor] = None,
    self_bias: Optional[Tensor] = None,
    hard_labels: Optional[Tensor] = None,
    config: Union[RouteConfig, str, None] = None,
    backend: str = "auto",
    student_transform: Optional[LogitTransform] = None,
    teacher_transform: Optional[LogitTransform] = None,
    self_transform: Optional[LogitTransform] = None,
    vocab_group: Optional[Any] = None,
    reduce_hidden_grad: bool = True,
) -> RoutedLossOutput:
    """The DOPD routed distillation loss from hidden states and output projections.

    Args:
        student_hidden: (B, T, Hs) or (N, Hs), the trained student's last hidden states (requires grad).
        student_weight: (V, Hs) the student's output projection (lm_head weight).
        teacher_hidden: (B, T, Ht) or (N, Ht), the frozen teacher's hidden states with privileged context.
        teacher_weight: (Vt, Ht), Vt >= V; rows >= V are padding and never carry probability.
        self_hidden: like student_hidden: the student's hidden states with privileged context (no grad).
        target_ids: (B, T) or (N,) the sampled tokens; position n predicts target_ids[n].
        mask: bool or 0/1 like target_ids (None: all valid). Masked positions may hold any id.
        student_bias, teacher_bias: (V,), (Vt,) output biases, if the heads have them.
        self_weight, self_bias: the privileged pass's projection when it is not the student's own
            (a frozen base or an EMA copy); default: the student's, detached. The self pass is stop-gradient.
        hard_labels: like target_ids, for the optional CE term (``config.ce_weight > 0``).
        config: a RouteConfig, a preset name ("dopd", "gkd", ...) or None (DOPD defaults).
        backend: "auto" (Triton on CUDA when installed and its one-time self-check passes, see
            ``selfcheck.py``; else torch), "torch", "reference", "triton".
        student_transform, teacher_transform, self_transform: the models' logit post-processing
            (``LogitTransform(scale, softcap)``: multiplier, then final soft-cap), applied right after the
            projection and before ``config.temperature``. None is the identity; ``self_transform``
            defaults to ``student_transform`` (the self pass is the student's model).
        vocab_group: a ``torch.distributed`` process group (tensor parallel) over which the output projections
            are split by vocabulary rows: each rank passes its contiguous shard of rows of ``student_weight``,
            ``teacher_weight``, ``self_weight`` and the biases (the shards, concatenated in the group's rank
            order, are the whole vocabulary; sizes may differ between ranks) and the same (replicated) hidden
            states, ``target_ids`` (global ids), ``mask`` and ``hard_labels``. Cut the teacher's padding rows
            beyond the student's vocabulary before sharding: a rank's teacher and student shards must have the
            same rows. Every rank gets what one process would on the concatenated weights (loss, per-token
            fields, metrics); the weight/bias gradients are the shard's rows of the full gradient. Collective:
            call it on every rank of the group; reading ``student_logprob`` may be one too (read it on every
            rank). Independent of ``config.stats_group`` (data parallel); they combine.
        reduce_hidden_grad: with ``vocab_group``, True (default): the gradient of ``student_hidden`` is the full
            gradient on every rank (the op sums the shards' parts over the group). False: each rank gets its
            own shard's part, for callers whose tensor-parallel region all-reduces the input gradient itself
            (Megatron's ``copy_to_tensor_model_parallel_region``), so that nothing is counted twice.

    Returns:
        RoutedLossOutput: ``loss`` (differentiable w.r.t. student_hidden, student_weight, student_bias)
        and per-token ``per_token_loss``, ``route``, ``adv_gap``, ``q_self``, ``q_teacher``,
        ``student_logprob``; ``metrics()`` for logging.
    """
    config = as_config(config)
    if not isinstance(reduce_hidden_grad, bool):
        raise ValueError(f"reduce_hidden_grad must be a bool, got {reduce_hidden_grad!r}")
    inputs = (student_hidden, student_weight, teacher_hidden, teacher_weight, self_hidden, target_ids, mask,
              student_bias, teacher_bias, self_weight, self_bias, hard_labels, config)
    if vocab_group is None:
        valid = validate_hidden_inputs(*inputs)
    else:
        from .vocab_parallel import validate_sharded

        valid, layout = validate_sharded(*inputs, vocab_group)
    s_tf = as_transform("student_transform", student_transform)
    kwargs = dict(
        student_bias=student_bias, teacher_bias=teacher_bias, self_weight=self_weight, self_bias=self_bias,
        hard_labels=hard_labels, config=config, student_transform=s_tf,
        teacher_transform=as_transform("teacher_transform", teacher_transform),
        self_transform=s_tf if self_transform is None else as_transform("self_transform", self_transform),
    )
    args = (student_hidden, student_weight, teacher_hidden, teacher_weight, self_hidden, target_ids, valid)
    chosen = _resolve_backend(backend, student_hidden.device, config, student_hidden.dtype,
                              CallShape.of(student_hidden, student_weight, student_bias, teacher_bias,
                                           (s_tf, kwargs["teacher_transform"], kwargs["self_transform"])))
    if vocab_group is not None:
        # (Both compute backends run the same collectives, so ranks whose "auto" self-checks disagreed
        # would still stay in step.)
        from .vocab_parallel import sharded_reference, vocab_parallel_routed_loss

        if chosen == "reference":
            return sharded_reference(*args, layout=layout, reduce_hidden_grad=reduce_hidden_grad, **kwargs)
        return vocab_parallel_routed_loss(*args, layout=layout, backend=chosen, reduce_hidden_grad=reduce_hidden_grad,
                                          **kwargs)
    if chosen == "reference":
        return reference_routed_loss(*args, **kwargs)
    if chosen == "triton":
        from .triton import triton_routed_loss

        return triton_routed_loss(*args, **kwargs)
    return chunked_routed_loss(*args, **kwargs)


def routed_loss_from_logits(
    student_logits: Tensor,
    teacher_logits: Tensor,
    self_logits: Tensor,
    target_ids: Tensor,
    mask: Optional[Tensor] = None,
    *,
    hard_labels: Optional[Tensor] = None,
    config: Union[RouteConfig, str, None] = None,
) -> RoutedLossOutput:
    """The same loss for code that already has logits.

    Shapes: student_logits / self_logits (B, T, V) or (N, V); teacher_logits (..., Vt >= V), cut to V;
    target_ids, mask, hard_labels like the leading shape. Computes in float32 (float64 for float64
    inputs) with autograd; the gradient flows into ``student_logits`` only.
    """
    config = as_config(config)
    valid = validate_logit_inputs(student_logits, teacher_logits, self_logits, target_ids, mask, hard_labels, config)
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    return reference_from_logits(
        student_logits, teacher_logits, self_logits, target_ids, valid,
        hard_labels=hard_labels, config=config, dtype=dtype,
    )


class RoutedDistillationLoss(torch.nn.Module):
    """``routed_loss`` as a module, in the style of ``torch.nn`` losses.

    >>> loss_fn = RoutedDistillationLoss(RouteConfig.preset("dopd"))
    >>> out = loss_fn(student_hidden, lm_head.weight, teacher_hidden, teacher_lm_head.weight, self_hidden, ids, mask)
    >>> out.loss.backward()
    """

    def __init__(self, config: Union[RouteConfig, str, None] = None, backend: str = "auto",
                 vocab_group: Optional[Any] = None, reduce_hidden_grad: bool = True) -> None:
        super().__init__()
        self.config = as_config(config)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.vocab_group = vocab_group  # see routed_loss: the weights passed to forward are vocabulary shards
        self.reduce_hidden_grad = reduce_hidden_grad

    def forward(self, student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor,
                self_hidden: Tensor, target_ids: Tensor, mask: Optional[Tensor] = None, **kwargs) -> RoutedLossOutput:
        """See ``routed_loss``; keyword arguments (biases, self_weight, hard_labels, transforms) pass through."""
        kwargs.setdefault("vocab_group", self.vocab_group)
        kwargs.setdefault("reduce_hidden_grad", self.reduce_hidden_grad)
        return routed_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, self_hidden, target_ids,
                           mask, config=self.config, backend=self.backend, **kwargs)

    def extra_repr(self) -> str:
        group = "" if self.vocab_group is None else ", vocab_group=<process group>"
        return f"backend={self.backend!r}, config={self.config!r}{group}"
