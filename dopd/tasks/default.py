"""The embedded default run: ``dopd train`` with no student, teacher or data.

1. Build the character tokenizer in code (no download).
2. Give a tiny Llama teacher its skill by supervised training on worked solutions (cached on disk,
   keyed by a hash of its config), and warm-start a smaller student briefly on the same format, so
   that it samples well-formed responses but is clearly worse than the teacher.
3. Write the task's train and held-out records to ``OUTPUT_DIR/data/`` and hand everything to the
   ordinary trainer, which reports the student's greedy accuracy before and after distillation.
``--preset vanilla_opd`` (or any preset) runs the same pipeline with that baseline's loss.
``--task-size tiny`` shrinks every stage to seconds (for tests).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

from dopd.config import TrainConfig
from dopd.data import Record, write_records
from dopd.tasks.chain import all_problems, make_records
from dopd.tasks.models import ModelSpec, trained_model

TRAIN_SEED, EVAL_SEED = 1, 2

#: Teacher: larger and trained longer; student: smaller and only warm-started.
SPECS = {
    "full": {
        "teacher": ModelSpec(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, sft_steps=150,
                             sft_batch=32, vocab_multiple=16, seed=1),
        # The student is warm-started on hinted prompts only: it learns to use a hint (its privileged
        # self is strong, as an LLM's is in the paper) but has not learned to solve without one.
        "student": ModelSpec(hidden_size=48, num_layers=2, num_heads=4, intermediate_size=96, sft_steps=250,
                             sft_batch=32, hint_fraction=1.0, seed=2),
    },
    "tiny": {
        "teacher": ModelSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, sft_steps=8,
                             sft_batch=16, vocab_multiple=16, seed=1),
        "student": ModelSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, sft_steps=4,
                             sft_batch=16, seed=2),
    },
}
SIZES = {"full": {"train": 2000, "eval": 50}, "tiny": {"train": 64, "eval": 8}}


def default_task_config() -> TrainConfig:
    """TrainConfig defaults that suit the tiny models of the embedded task (flags and YAML still override)."""
    # self_model="frozen": the privileged self is the initial student (which reads hints well). With
    # the live student as its own privileged self, these tiny models collapse the self routes (the
    # hinted and unhinted outputs agree on junk; measured: sdpo 0.18 -> 0.00, dopd 0.18 -> 0.00),
    # while the frozen self gives dopd 0.18 -> 1.00 (README, "The embedded default").
    return TrainConfig(
        output_dir="dopd-default", learning_rate=2e-3, max_steps=100, self_model="frozen", prompts_per_step=16, num_generations=4,
        max_new_tokens=48, temperature=1.0, warmup_ratio=0.05, max_grad_norm=1.0, eval_batch_size=64,
        save_every=0, eval_every=30, answer_marker="####",
    )


def prepare_default_task(config: TrainConfig, log: Callable[[str], None] = print) -> tuple[TrainConfig, dict[str, Any]]:
    """Build (or load from cache) the tokenizer, teacher and student; write the data; return the
    config pointing at them and reference numbers (the teacher's accuracy without the hint)."""
    from dopd.tasks.tokenizer import build_char_tokenizer
    from dopd.trainer import template_from

    size = config.task_size
    tokenizer = build_char_tokenizer()
    template = template_from(config)
    specs = SPECS[size]
    teacher = trained_model("teacher", specs["teacher"], tokenizer, template, config.cache_dir, log)
    student = trained_model("student", specs["student"], tokenizer, template, config.cache_dir, log)
    data_dir = os.path.join(config.output_dir, "data")
    os.makedirs(data_dir, exist_ok=True)
    train_path, eval_path = os.path.join(data_dir, "train.jsonl"), os.path.join(data_dir, "eval.jsonl")
    write_records(make_records(SIZES[size]["train"], TRAIN_SEED), train_path)
    # Evaluation covers the whole (small) problem space; answers are never shown during training.
    eval_rows = [p.record() for p in all_problems()][: SIZES[size]["eval"]]
    write_records(eval_rows, eval_path)
    reference = {"teacher_accuracy": _teacher_accuracy(teacher, tokenizer, template, eval_rows, config)}
    log(f"teacher accuracy without the hint: {reference['teacher_accuracy']:.3f}")
    out = dataclasses.replace(config, student=student, teacher=teacher, data=train_path, eval_data=eval_path)
    return out, reference


def _teacher_accuracy(path: str, tokenizer: Any, template: Any, rows: list[dict[str, str]],
                      config: TrainConfig) -> float:
    """Greedy accuracy of the teacher on the held-out prompts, without the hint (the student's setting)."""
    from dopd.evaluate import evaluate
    from dopd.modeling import load_causal_lm

    model = load_causal_lm(path, "float32", __import__("torch").device("cpu"), trainable=False)
    recs = [Record(prompt=r["prompt"], privileged=r["privileged"], answer=r["answer"]) for r in rows]
    return evaluate(model, tokenizer, template, recs, max_new_tokens=config.max_new_tokens,
                    batch_size=config.eval_batch_size, marker=config.answer_marker)["accuracy"]
