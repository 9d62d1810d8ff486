"""One line of ``dopd train --help`` per TrainConfig field, and how its default reads.

``dopd.config.add_config_flags`` appends ``(default: X)`` once to each line, X being the field's
dataclass default, or the words in :data:`DEFAULT_TEXT` where a bare value would mislead (``None``
meaning "the embedded task", ``0`` meaning "never"). Every field must have a line here: a test checks it.
"""

from __future__ import annotations

FIELD_HELP: dict[str, str] = {
    "student": "path or Hub id of the student (a causal LM); give --student, --teacher and --data together",
    "teacher": "path or Hub id of the frozen teacher; its vocabulary may be padded (more rows than the student's)",
    "tokenizer": "tokenizer path or Hub id",
    "data": "JSON lines with prompt and privileged (the hint) per record",
    "eval_data": "held-out JSON lines with prompt and answer, for greedy accuracy before/after training",
    "output_dir": "where config.json, metrics.jsonl and the checkpoints go",
    "preset": "the loss: dopd or a baseline's route table",
    "loss": "a RouteConfig field, e.g. top_k=64 or reduction=token_mean (repeatable)",
    "loss_backend": "routed_loss backend: auto | torch | triton | reference",
    "self_model": "the privileged self: live (the student itself, the paper) | frozen (the initial student) | "
                  "ema (a moving average of the student)",
    "self_ema_decay": "ema self: self <- decay * self + (1 - decay) * student after every optimizer step",
    "student_template": "the student's context; {prompt} is replaced",
    "privileged_template": "the self's and teacher's context; {prompt} and {privileged} are replaced",
    "response_prefix": "appended to contexts when the tokenizer has no chat template",
    "use_chat_template": "render contexts through the tokenizer's chat template when it has one",
    "num_generations": "sampled responses per prompt (G)",
    "temperature": "sampling temperature of the rollouts; the loss and routing use the same one unless "
                   "--loss temperature=T is given (a warning then says that they differ)",
    "top_p": "nucleus sampling of the rollouts (1: off)",
    "max_new_tokens": "longest sampled response, in tokens",
    "prompts_per_step": "prompts per micro-batch over all ranks (each rank takes an equal share)",
    "grad_accum": "micro-batches per optimizer step",
    "learning_rate": "AdamW peak learning rate",
    "weight_decay": "AdamW weight decay",
    "adam_betas": "AdamW betas",
    "warmup_ratio": "share of max_steps with a linear warm-up before the cosine decay",
    "max_grad_norm": "clip the global gradient norm to this (0: no clipping)",
    "max_steps": "optimizer steps",
    "seed": "data order and sampling seed (rank r samples with its own seed derived from it)",
    "dtype": "float32, or mixed precision: bfloat16 | float16 compute over fp32 master weights and optimizer "
             "state; teacher and frozen self stored in that dtype",
    "device": "auto | cpu | cuda | cuda:N (under torchrun: auto | cpu | cuda, each rank on cuda:LOCAL_RANK)",
    "use_liger": "apply Liger-Kernel's model patches on CUDA when installed",
    "progress": "show a progress bar",
    "report_to": "none | tensorboard | wandb, beside metrics.jsonl",
    "log_every": "write a metrics row every N steps",
    "eval_every": "evaluate every N steps",
    "eval_limit": "evaluate on the first N eval records",
    "eval_batch_size": "prompts per generate call in evaluation (per rank)",
    "answer_marker": "the final answer follows the last occurrence of this marker",
    "parallel": "under torchrun: ddp (replicated student) | fsdp (FSDP2: student and teacher sharded)",
    "local_routing_stats": "routing statistics per rank instead of over the global batch (under torchrun)",
    "dist_timeout": "seconds a collective waits for the other ranks before failing with an error",
    "save_every": "write a checkpoint every N steps",
    "keep_checkpoints": "checkpoints kept (oldest deleted first)",
    "resume": "continue from the newest checkpoint in --output-dir",
    "task": "the built-in task to run when no --student/--teacher/--data is given (dopd.tasks.registry)",
    "cache_dir": "where the built-in task caches its trained tiny teacher and student",
    "task_size": "built-in task size: full | small | tiny (tiny: seconds, for tests)",
}

#: Defaults whose bare value would mislead.
DEFAULT_TEXT: dict[str, str] = {
    "student": "none: the built-in task's",
    "teacher": "none: the built-in task's",
    "tokenizer": "the student's",
    "data": "none: the built-in task's",
    "eval_data": "none: no evaluation",
    "eval_every": "0: before and after training only",
    "eval_limit": "0: all",
    "save_every": "0: the final checkpoint only",
    "cache_dir": "$DOPD_CACHE or ~/.cache/dopd",
    "task": "the default task (digit_sum)",
    "loss": "the preset's",
}
