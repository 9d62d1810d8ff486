"""Worker of test_trl_distributed.py: two DOPDTrainer steps on 2 CPU processes (torchrun, gloo).

Each rank records what its routed_loss saw (per-token signals, routes, thresholds, whether a process
group was passed) and saves it to ``OUT_DIR/rank{r}.pt``; rank 0 also saves the trainer state.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _trl_setup as setup  # noqa: E402
from datasets import Dataset  # noqa: E402

from dopd.integrations.trl import DOPDConfig, DOPDTrainer  # noqa: E402


class RecordingTrainer(DOPDTrainer):
    """DOPDTrainer that keeps a detached copy of each routed_loss result."""

    records: list = []

    def _routed_loss(self, **kwargs):
        out = super()._routed_loss(**kwargs)
        self.records.append({
            "grouped": kwargs["config"].stats_group is not None,
            "q_self": out.q_self.detach().clone(), "q_teacher": out.q_teacher.detach().clone(),
            "route": out.route.clone(), "thresholds": {k: v.detach().clone() for k, v in out.thresholds.items()},
        })
        return out


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    tok = setup.tokenizer()
    student = setup.tiny_llama("student", tok, 0, torch.float32)
    teacher = setup.tiny_llama("teacher", tok, 1, torch.float32)
    args = DOPDConfig(output_dir=out_dir, use_cpu=True, ddp_backend="gloo", bf16=False, report_to="none",
                      max_steps=2, per_device_train_batch_size=2, max_completion_length=8, logging_steps=1,
                      save_strategy="no", gradient_checkpointing=False, route_top_k=8, seed=0)
    trainer = RecordingTrainer(model=student, teacher_model=teacher, args=args,
                               train_dataset=Dataset.from_list(setup.examples(16, seed=1)), processing_class=tok)
    trainer.train()
    rank = trainer.accelerator.process_index
    torch.save({"world": trainer.accelerator.num_processes, "records": trainer.records},
               os.path.join(out_dir, f"rank{rank}.pt"))
    trainer.save_state()  # rank 0 writes trainer_state.json


if __name__ == "__main__":
    main(sys.argv[1])
