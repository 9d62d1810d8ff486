"""Shared by test_distributed.py and its torchrun worker: fixed rollouts, the test configs, launching."""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from typing import Sequence

import torch

from dopd.config import TrainConfig
from dopd.rollout import Rollout
from dopd.trainer import Trainer

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent


def fixed_rollout(contexts: Sequence[Sequence[int]], generations: int, tokenizer, max_len: int = 7) -> Rollout:
    """A response per context that depends only on (context, generation index): the same on 1 rank or 2.

    Random ids of random length (some end with EOS), never the pad or EOS inside.
    """
    pad, eos, vocab = tokenizer.pad_token_id, tokenizer.eos_token_id, len(tokenizer)
    rows = []
    for i, ctx in enumerate(contexts):
        key = hashlib.sha256(repr((tuple(ctx), i % generations)).encode()).hexdigest()
        g = torch.Generator().manual_seed(int(key[:12], 16))
        n = int(torch.randint(1, max_len + 1, (1,), generator=g))
        toks = torch.randint(3, vocab, (n,), generator=g)  # ids 0-2: pad, bos, eos
        if int(key[12], 16) % 2:
            toks[-1] = eos
        rows.append(toks)
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)], mask[i, : len(r)] = r, True
    return Rollout(tokens=tokens, mask=mask)


class FixedRolloutTrainer(Trainer):
    """The ordinary trainer with :func:`fixed_rollout` instead of sampling, recording each loss output."""

    def rollout(self, contexts):
        return fixed_rollout(contexts, self.config.num_generations, self.tokenizer)

    def micro_batch(self, records):
        out, stats = super().micro_batch(records)
        self.outputs = getattr(self, "outputs", []) + [out]
        return out, stats


def step_config(cfg: TrainConfig, **kw) -> TrainConfig:
    """The equivalence tests' run: 4 prompts x 2 responses, no evaluation, clipping active.

    AdamW's first step moves a weight by lr * g / (|g| + 1e-8): for the gradients that are rounding noise
    (|g| ~ 1e-9, where one process and two differ by a few percent) it amplifies that noise to ~lr * 1e-2.
    lr 5e-5 keeps it far below the 1e-6 the parameters must agree to (the gradients are compared directly).
    """
    base = dict(prompts_per_step=4, num_generations=2, max_steps=4, learning_rate=5e-5, warmup_ratio=0.0,
                max_grad_norm=0.01, eval_data=None, progress=False, self_model="frozen")
    return replace(cfg, **{**base, **kw})


def whole_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole (gathered from its shards if it is a DTensor: a collective), detached, on the CPU."""
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()


def whole_params(model: torch.nn.Module, every_name: bool = False) -> dict:
    """``model``'s parameters, whole (every rank must call this under FSDP2). ``every_name``: a shared
    parameter (a tied lm_head) under each of its names, not only the first."""
    return {n: whole_tensor(p) for n, p in model.named_parameters(remove_duplicate=not every_name)}


def full_grads_and_params(trainer: Trainer, every_name: bool = False) -> tuple[dict, dict]:
    """The student's whole gradients and parameters (every rank must call this under FSDP2)."""
    named = trainer.student.named_parameters(remove_duplicate=not every_name)
    grads = {n: whole_tensor(p.grad) for n, p in named if p.grad is not None}
    return grads, whole_params(trainer.student, every_name)


def greedy_responses(trainer: Trainer, prompts: int = 4, max_new_tokens: int = 6) -> torch.Tensor:
    """The student's greedy responses (tokens, right-padded) to the first ``prompts`` records, generated as the
    rollouts are: through the wrapped student's forward (every rank must call this under FSDP2)."""
    contexts = trainer.template.encode(trainer.tokenizer, trainer.records[:prompts], privileged=False)
    rollout = trainer._generate(None, trainer.tokenizer, contexts, max_new_tokens=max_new_tokens, do_sample=False)
    return rollout.tokens.cpu()


def tie_embeddings(source: str, target: str) -> str:
    """A copy of the causal LM at ``source`` (and its tokenizer) with ``tie_word_embeddings=True``, saved at
    ``target``: the head is the input embedding (the embedding's weights are kept, the head's dropped), as in
    Qwen3-0.6B, Gemma or Llama-3.2-1B."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    untied = AutoModelForCausalLM.from_pretrained(source)
    config = untied.config
    config.tie_word_embeddings = True
    tied = AutoModelForCausalLM.from_config(config)
    state = {k: v for k, v in untied.state_dict().items() if k != "lm_head.weight"}
    missing, unexpected = tied.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    tied.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target


def torchrun(args: Sequence[str], timeout: float, cwd: str, env: dict) -> tuple[int, str, float]:
    """Run ``torchrun --standalone --nproc_per_node 2 ARGS``; return (exit status, output, seconds).

    A session of its own: on a timeout the whole group (torchrun and both ranks) is killed and the test
    fails instead of hanging. ``torchrun`` is the script next to this Python (``python -m
    torch.distributed.run`` where it is missing: the same program).
    """
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    launcher = [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]
    # --standalone: a rendezvous on a free local port, so that concurrent test runs do not meet.
    cmd = [*launcher, "--standalone", "--nproc_per_node", "2", *args]
    env = dict(os.environ, **env, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise TimeoutError(f"torchrun did not finish in {timeout} s:\n{output[-4000:]}") from None
    return proc.returncode, output, time.monotonic() - t0
