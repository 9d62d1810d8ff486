"""DOPD with TRL: train a student on-policy with ``DOPDTrainer`` (TRL's DistillationTrainer + the routed loss).

Offline, with tiny models built in code (the embedded task's character tokenizer, a tiny Llama teacher
and student given a few supervised steps, the "+3 mod 10" chain prompts and their hints):

    python examples/trl_dopd.py --max-steps 2 --output-dir /tmp/dopd-trl

Real models and data (a JSON/JSONL file or a Hub dataset with ``prompt`` and ``privileged_context``
columns); every field of DOPDConfig and TRL's DistillationConfig is a flag:

    accelerate launch --num_processes 8 examples/trl_dopd.py \
        --student Qwen/Qwen3-1.7B --teacher Qwen/Qwen3-8B --dataset hints.jsonl \
        --preset dopd --bf16 --per-device-train-batch-size 4 --max-completion-length 1024 \
        --learning-rate 5e-6 --max-steps 200 --output-dir runs/dopd

The run ends with ``trainer.save_state()``: ``OUTPUT_DIR/trainer_state.json`` holds the per-step route
fractions (``dopd/frac/HT`` ...) in its ``log_history``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from transformers import HfArgumentParser

from dopd.integrations.trl import DOPDConfig, DOPDTrainer

#: Defaults for the offline tiny run (flags still override them); a real run keeps TRL's defaults.
TINY_DEFAULTS = dict(
    output_dir="dopd-trl-tiny", max_steps=2, per_device_train_batch_size=4, max_completion_length=24,
    learning_rate=1e-3, logging_steps=1, report_to="none", bf16=False, use_cpu=not torch.cuda.is_available(),
    gradient_checkpointing=False, save_strategy="no", route_top_k=16,
    # The tiny models were trained on "{prompt}\n\n{hint}\n" + response: the prompts below end with "\n".
    privileged_prompt_template="{prompt}\n{privileged_context}\n",
)


@dataclass
class ScriptArguments:
    """What to train: model names or paths and a dataset; all unset = the offline tiny run."""

    student: Optional[str] = field(default=None, metadata={"help": "Student model name or path."})
    teacher: Optional[str] = field(default=None, metadata={"help": "Teacher model name or path (same tokenizer)."})
    dataset: Optional[str] = field(default=None, metadata={"help": "A .json/.jsonl file or a Hub dataset name "
                                                                   "with prompt and privileged_context columns."})
    dataset_split: str = field(default="train", metadata={"help": "Split of a Hub dataset."})
    num_prompts: int = field(default=64, metadata={"help": "Offline run: number of task prompts."})


def tiny_setup(num_prompts: int) -> tuple[Any, Any, Any, Any]:
    """Student, teacher, tokenizer and dataset of the offline run, all built in code (a few seconds on a CPU)."""
    from datasets import Dataset

    from dopd.data import PromptTemplate
    from dopd.tasks.chain import make_problems
    from dopd.tasks.default import SPECS
    from dopd.tasks.models import supervised_train
    from dopd.tasks.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    template = PromptTemplate(use_chat_template=False)
    # The teacher's vocabulary is padded to a multiple of 16 (64 rows for the student's 56): DOPD allows it.
    teacher = supervised_train(SPECS["tiny"]["teacher"], tokenizer, template, make_problems)
    student = supervised_train(SPECS["tiny"]["student"], tokenizer, template, make_problems)
    rows = [{"prompt": p.prompt + "\n", "privileged_context": p.privileged}
            for p in make_problems(num_prompts, seed=1)]
    return student, teacher, tokenizer, Dataset.from_list(rows)


def real_setup(script: ScriptArguments) -> tuple[Any, Any, Any, Any]:
    """Names/paths are loaded by the trainer, as TRL loads them (``--model-init-kwargs``, the student's tokenizer)."""
    from datasets import load_dataset

    if not (script.student and script.teacher and script.dataset):
        raise SystemExit("trl_dopd.py: error: --student, --teacher and --dataset go together "
                         "(none of them: the offline tiny run)")
    if script.dataset.endswith((".json", ".jsonl")):
        dataset = load_dataset("json", data_files=script.dataset, split="train")
    else:
        dataset = load_dataset(script.dataset, split=script.dataset_split)
    return script.student, script.teacher, None, dataset


def main(argv: Optional[list[str]] = None) -> DOPDTrainer:
    """Parse the flags, train, save the state (and the model); returns the trainer."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser((ScriptArguments, DOPDConfig))
    offline = not any(a.split("=")[0] in ("--student", "--teacher", "--dataset") for a in argv)
    if offline:
        parser.set_defaults(**TINY_DEFAULTS)
    script, config = parser.parse_args_into_dataclasses(argv)
    student, teacher, tokenizer, dataset = tiny_setup(script.num_prompts) if offline else real_setup(script)
    trainer = DOPDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                          processing_class=tokenizer)
    trainer.train()
    trainer.save_state()
    trainer.save_model()
    return trainer


if __name__ == "__main__":
    main()
