"""``DOPDTrainer``: TRL's ``DistillationTrainer`` with the DOPD routed loss.

Everything that is TRL's stays TRL's: on-policy generation (transformers or vLLM), batching and
gradient accumulation, accelerate wrapping (DDP, FSDP, DeepSpeed), PEFT, gradient checkpointing,
logging. This class adds, per generation batch, the privileged prompts (``prompt`` +
``privileged_context``, tokenized through the same chat template) and, per micro-batch, two no-grad
passes over ``[privileged prompt | the same completion]``: the privileged self and the teacher. All
prompts are left-padded and completions right-padded, so the last ``C`` hidden states of every pass
(TRL's ``_get_last_hidden_state``) predict the same completion tokens: the response positions line up
whatever the prompt lengths. The three hidden states go to ``dopd_kernels.routed_loss`` with the
models' output projections; no (B, C, V) logits are made.
"""

from __future__ import annotations

import copy
import textwrap
from typing import Any, Optional

import torch
from accelerate.utils import is_peft_model
from trl import DistillationTrainer
from trl.models import prepare_deepspeed
from trl.trainer.utils import create_model_from_path, pad

from dopd_kernels import RoutedLossOutput, routed_loss

from .config import DOPDConfig
from .heads import data_parallel_group, head_params, logit_transform, vocab_rows
from .metrics import pack, summarize
from .privileged import PRIVILEGED, check_columns, privileged_prompts
from .version import check_trl_version

Tensor = torch.Tensor


class DOPDTrainer(DistillationTrainer):
    """On-policy distillation with DOPD's routed loss, on TRL's ``DistillationTrainer``.

    Arguments are ``DistillationTrainer``'s; ``args`` is a :class:`DOPDConfig` and ``teacher_model`` is
    required. The dataset has a ``prompt`` column (text or chat messages) and a ``privileged_context``
    column (TRL's SDFT convention; an empty string for an example without one). The teacher must share
    the student's tokenizer; its vocabulary may be padded beyond the student's (Qwen2.5-7B's 152064 rows
    for 0.5B's 151936: the extra rows never carry probability), never smaller.

    Per optimizer step TRL's metrics (``log_history``, TensorBoard, W&B) get ``dopd/frac/{LH,LL,HT,HS}``,
    ``dopd/loss/...`` (mean weighted loss per route), ``dopd/{adv_gap,q_self,q_teacher}_mean``,
    ``dopd/threshold/...`` (the routing thresholds) and ``dopd/n_tokens``, over all data-parallel ranks.
    """

    _tag_names = ["trl", "distillation", "dopd"]
    _name = "DOPD"
    _paper = {
        "title": "DOPD: Dual On-policy Distillation",
        "id": "2606.30626",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{yu2026dopd,
                title        = {{DOPD: Dual On-policy Distillation}},
                author       = {Yu and Li and Si and Zhang and Yan and others},
                year         = 2026,
                eprint       = {arXiv:2606.30626}
            }"""),
    }

    def __init__(
        self,
        model: Any,
        teacher_model: Any = None,
        args: Optional[DOPDConfig] = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        callbacks: Optional[list] = None,
        optimizers: tuple = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
        tools: Optional[list] = None,
    ) -> None:
        check_trl_version()
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = DOPDConfig(f"{str(name).rstrip('/').split('/')[-1]}-DOPD")
        if not isinstance(args, DOPDConfig):
            raise TypeError(f"args must be a DOPDConfig (it adds the route settings), got {type(args).__name__}")
        if teacher_model is None:
            raise ValueError("teacher_model: DOPDTrainer needs a teacher (a model or a model name/path)")
        check_columns(train_dataset, "train_dataset")
        check_columns(eval_dataset, "eval_dataset")
        teacher = _load_teacher(teacher_model, args)
        # The teacher is prepared here rather than by DistillationTrainer, which insists on equal vocabulary
        # sizes; the routed loss also takes a teacher whose vocabulary is padded beyond the student's.
        super().__init__(model, teacher_model=None, args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks,
                         optimizers=optimizers, quantization_config=quantization_config, peft_config=peft_config,
                         tools=tools)
        if self._is_vlm:
            raise NotImplementedError("DOPDTrainer: vision-language models (a ProcessorMixin processing_class) are "
                                      "not supported yet: the privileged prompts would need the images too")
        student = self.accelerator.unwrap_model(self.model)
        v_student, v_teacher = vocab_rows(student), vocab_rows(teacher)
        if v_teacher < v_student:
            raise ValueError(f"teacher_model: its vocabulary ({v_teacher} output rows) is smaller than the student's "
                             f"({v_student}); DOPD needs the student's tokenizer and a teacher vocabulary >= the "
                             "student's (extra rows are padding)")
        self._student_transform = logit_transform(student)
        self._teacher_transform = logit_transform(teacher)
        self._self_source = self._build_self(student, args)
        self.teacher_model = self._prepare_frozen(teacher)
        self._route_config = args.route_config(stats_group=data_parallel_group(self.accelerator))
        self._threshold_names: list[str] = []

    # ----------------------------------------------------------------------------------------- set-up

    def _build_self(self, student: Any, args: DOPDConfig) -> Any:
        """None for the live self; ``"adapters_off"`` for a frozen PEFT self; else a prepared frozen copy."""
        if args.self_model == "live":
            return None
        if is_peft_model(student):
            return "adapters_off"  # the base model without the adapters is the initial student, at no memory cost
        if self.is_deepspeed_enabled and getattr(args.deepspeed_plugin, "zero_stage", 0) == 3:
            raise NotImplementedError("self_model='frozen' with DeepSpeed ZeRO-3 needs a PEFT student (the self is "
                                      "then the base model with the adapters disabled); use self_model='live'")
        # Copied before train() wraps and shards the student: the frozen self is the initial student.
        frozen = copy.deepcopy(student)
        frozen.requires_grad_(False)
        return self._prepare_frozen(frozen)

    def _prepare_frozen(self, model: Any) -> Any:
        """Prepare a no-grad model as TRL prepares its teacher (DeepSpeed inference engine, or accelerate)."""
        model.eval()
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(model, self.accelerator)
        return self.accelerator.prepare_model(model, evaluation_mode=True)

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = ["prompt", PRIVILEGED]

    # ------------------------------------------------------------------------------------------ data

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """TRL's generation batch plus the privileged prompts and the number of sequences (for ``seq_mean``)."""
        if inputs and PRIVILEGED not in inputs[0]:
            raise ValueError("privileged_context: the batch has no 'privileged_context' column; DOPDTrainer needs "
                             "it (TRL's SDFT convention; an empty string for an example without one)")
        prompts = privileged_prompts(inputs, self.args.privileged_prompt_template)  # checked before generating
        output = super()._generate_and_score_completions(inputs)
        ids, _, multimodal = self._tokenize_prompts(prompts)
        if multimodal:
            raise NotImplementedError("DOPDTrainer: multimodal prompts are not supported yet")
        device = output["completion_ids"].device
        tensors = [torch.tensor(x, dtype=torch.long) for x in ids]
        output["privileged_prompt_ids"] = pad(tensors, padding_value=self._tokenizer.pad_token_id,
                                              padding_side="left", pad_to_multiple_of=self.pad_to_multiple_of
                                              ).to(device)
        output["privileged_prompt_mask"] = pad([torch.ones_like(t) for t in tensors], padding_value=0,
                                               padding_side="left", pad_to_multiple_of=self.pad_to_multiple_of
                                               ).to(device)
        has_tokens = (_loss_mask(output).sum(1) > 0).sum()
        output["num_sequences_in_batch"] = self.accelerator.gather(has_tokens).sum()
        return output

    # ------------------------------------------------------------------------------------------ loss

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """The routed loss of one micro-batch, scaled so that the optimizer step sees ``route_reduction`` over
        the whole batch (all accumulation steps and ranks); route statistics go to TRL's metrics."""
        # The whole loss runs inside the student wrapper's forward (TRL's `_forward_redirection`), so DDP
        # prepares its backward and FSDP/DeepSpeed keep the student's parameters gathered for the head.
        unwrapped = self.accelerator.unwrap_model(model)
        loss, packed = self._forward_redirection(model, unwrapped, self._compute_loss, unwrapped, inputs)
        # Collectives after the wrapped forward returns, as TRL does for its entropy metric.
        gathered = self.accelerator.gather(packed.unsqueeze(0))
        mode = "train" if self.model.training else "eval"
        for key, value in summarize(gathered, self._threshold_names).items():
            self._metrics[mode][key].append(value)
        return (loss, None) if return_outputs else loss

    def _compute_loss(self, unwrapped_student: Any, inputs: dict[str, Any]) -> tuple[Tensor, Tensor]:
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        loss_mask = _loss_mask(inputs)
        keep = completion_ids.size(1)
        student_hidden = self._get_last_hidden_state(
            unwrapped_student, torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
            torch.cat([inputs["prompt_mask"], completion_mask], dim=1), keep)
        priv_ids = torch.cat([inputs["privileged_prompt_ids"], completion_ids], dim=1)
        priv_mask = torch.cat([inputs["privileged_prompt_mask"], completion_mask], dim=1)
        with torch.no_grad():
            self_hidden, self_model = self._self_pass(unwrapped_student, priv_ids, priv_mask, keep)
            teacher = self.accelerator.unwrap_model(self.teacher_model)
            teacher_hidden = self._frozen_pass(self.teacher_model, priv_ids, priv_mask, keep)

        s_weight, s_bias = head_params(unwrapped_student, student_hidden.dtype)
        t_weight, t_bias = head_params(teacher, teacher_hidden.dtype)
        p_weight = p_bias = None
        if self_model is not None:
            p_weight, p_bias = head_params(self_model, student_hidden.dtype)
        if t_weight.device != s_weight.device:
            raise ValueError(f"The student's lm_head is on {s_weight.device} but the teacher's is on "
                             f"{t_weight.device}; place both on one device in their device_map")
        device = s_weight.device
        out = self._routed_loss(
            student_hidden=student_hidden.to(device), student_weight=s_weight,
            teacher_hidden=teacher_hidden.to(device), teacher_weight=t_weight,
            self_hidden=self_hidden.to(device=device, dtype=student_hidden.dtype),
            target_ids=completion_ids.to(device), mask=loss_mask.to(device) != 0,
            student_bias=s_bias, teacher_bias=t_bias, self_weight=p_weight, self_bias=p_bias,
            config=self._route_config, backend=self.args.loss_backend,
            student_transform=self._student_transform, teacher_transform=self._teacher_transform,
        )
        loss = out.loss * self._reduction_scale(inputs, loss_mask).to(device=device, dtype=out.loss.dtype)
        packed, self._threshold_names = pack(out)
        return loss, packed

    def _routed_loss(self, **kwargs: Any) -> RoutedLossOutput:
        """One ``dopd_kernels.routed_loss`` call (a seam for subclasses that want the per-token routing)."""
        return routed_loss(**kwargs)

    def _self_pass(self, unwrapped_student: Any, ids: Tensor, mask: Tensor, keep: int) -> tuple[Tensor, Any]:
        """The privileged self's hidden states, and the model whose head it uses (None: the student's)."""
        if self._self_source is None:  # live: the student itself (already inside its wrapper's forward)
            return self._get_last_hidden_state(unwrapped_student, ids, mask, keep), None
        if self._self_source == "adapters_off":
            with unwrapped_student.disable_adapter():
                return self._get_last_hidden_state(unwrapped_student, ids, mask, keep), None
        return (self._frozen_pass(self._self_source, ids, mask, keep),
                self.accelerator.unwrap_model(self._self_source))

    def _frozen_pass(self, wrapped: Any, ids: Tensor, mask: Tensor, keep: int) -> Tensor:
        """A no-grad model's hidden states, routed through its own wrapper as TRL runs its teacher (so that
        FSDP/DeepSpeed gather its sharded parameters before the backbone runs)."""
        wrapped.eval()
        unwrapped = self.accelerator.unwrap_model(wrapped)
        return self._forward_redirection(wrapped, unwrapped, self._get_last_hidden_state, unwrapped, ids, mask, keep)

    def _reduction_scale(self, inputs: dict[str, Any], loss_mask: Tensor) -> Tensor:
        """Factor that turns the micro-batch's reduced loss into its share of the optimizer batch's.

        TRL accumulates gradients without dividing by the accumulation steps (``loss_is_scaled_for_ga``)
        and DDP averages over the P ranks. ``token_mean`` / ``seq_mean``: local mean x local count /
        (global count / P), the global count over the whole generation batch (TRL's ``num_items_in_batch``,
        and the number of sequences with a valid token); ``sum``: x P. In evaluation: 1 (local reduction).
        """
        one = torch.ones((), dtype=torch.float64, device=loss_mask.device)
        if not self.model.training or inputs.get("num_items_in_batch") is None:
            return one
        procs = float(self.accelerator.num_processes)
        reduction = self._route_config.reduction
        if reduction == "sum":
            return one * procs
        if reduction == "token_mean":
            local, total = loss_mask.sum(), inputs["num_items_in_batch"]
        else:
            local, total = (loss_mask.sum(1) > 0).sum(), inputs["num_sequences_in_batch"]
        total = total.to(device=loss_mask.device, dtype=torch.float64).clamp(min=1.0)
        return local.to(torch.float64) * procs / total


def _loss_mask(inputs: dict[str, Any]) -> Tensor:
    """Completion tokens that are trained on: TRL's completion mask, without tool-result tokens."""
    mask = inputs["completion_mask"]
    return mask if inputs.get("tool_mask") is None else mask * inputs["tool_mask"]


def _load_teacher(teacher: Any, args: DOPDConfig) -> Any:
    """A teacher given as a name or path is loaded as TRL's DistillationTrainer loads it."""
    if not isinstance(teacher, str):
        if args.teacher_model_init_kwargs is not None:
            raise ValueError("teacher_model_init_kwargs: set, but teacher_model is already instantiated")
        return teacher
    kwargs = dict(args.teacher_model_init_kwargs or {})
    dtype = kwargs.get("dtype")
    kwargs["dtype"] = dtype if dtype in ("auto", None) or isinstance(dtype, torch.dtype) else getattr(torch, dtype)
    if args.teacher_model_revision is not None:
        kwargs.setdefault("revision", args.teacher_model_revision)
    if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
        kwargs["device_map"] = None  # distributed training needs device_map=None
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    return create_model_from_path(teacher, **kwargs)
