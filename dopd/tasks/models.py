"""Tiny Llama-style teachers and students for the built-in tasks, and their brief supervised training.

Both models share the code-built character tokenizer. A task supplies the worked examples (a
``sample(n, seed)`` function returning problems with ``prompt``, ``privileged`` and ``solution(hinted)``);
its teacher is larger and trained longer, its student smaller and only warm-started, so that the student
is clearly worse and has something to learn from distillation. Trained models are cached on disk,
keyed by a hash of everything that determines them (the task's name and version included).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dopd.data import PromptTemplate, Record
from dopd.passes import left_pad
from dopd.tasks.tokenizer import ALPHABET

#: Bump when the training recipe changes, so stale caches are not reused (tasks have their own version).
RECIPE_VERSION = 2


class WorkedProblem(Protocol):
    """What supervised training needs from a task's problem."""

    prompt: str
    privileged: str

    def solution(self, hinted: bool) -> str:
        """The worked response (``hinted``: the response a solver that reads the hint writes)."""


#: ``sample(n, seed)``: n problems for one SFT step, never from the task's held-out split.
Sampler = Callable[[int, int], Sequence[WorkedProblem]]


@dataclass(frozen=True)
class ModelSpec:
    """Size of a tiny Llama and the supervised recipe that gives it its skill."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    sft_steps: int
    sft_batch: int = 64
    sft_lr: float = 3e-3
    hint_fraction: float = 0.5  # share of SFT examples that show the hint (so the model can read hints)
    vocab_multiple: int = 1  # pad the vocabulary rows (a teacher with Vt > V exercises padded rows)
    seed: int = 0

    def llama_config(self, tokenizer: Any) -> LlamaConfig:
        """The transformers config for this size and ``tokenizer``."""
        vocab = -(-len(tokenizer) // self.vocab_multiple) * self.vocab_multiple
        return LlamaConfig(
            vocab_size=vocab, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads, max_position_embeddings=256, tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, rms_norm_eps=1e-5,
        )

    def cache_key(self, tokenizer: Any, template: PromptTemplate, task_key: str) -> str:
        """A short hash of everything that determines the trained weights (``task_key``: name and version)."""
        blob = json.dumps({"spec": asdict(self), "alphabet": ALPHABET, "recipe": RECIPE_VERSION, "task": task_key,
                           "template": asdict(template), "vocab": len(tokenizer)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_cache_dir() -> str:
    """``$DOPD_CACHE`` or ``$XDG_CACHE_HOME/dopd`` or ``~/.cache/dopd``."""
    if os.environ.get("DOPD_CACHE"):
        return os.environ["DOPD_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dopd")


def _sft_batch(problems: Sequence[WorkedProblem], tokenizer: Any, template: PromptTemplate, rng: random.Random,
               hint_fraction: float) -> dict[str, torch.Tensor]:
    """Context + solution + EOS per problem; labels only on the solution and EOS."""
    seqs, labels = [], []
    for p in problems:
        rec = Record(prompt=p.prompt, privileged=p.privileged)
        hinted = rng.random() < hint_fraction
        ctx = template.encode(tokenizer, [rec], privileged=hinted)[0]
        resp = tokenizer(p.solution(hinted), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(ctx + resp)
        labels.append([-100] * len(ctx) + resp)
    ids, attn = left_pad(seqs, tokenizer.pad_token_id)
    lab, _ = left_pad(labels, -100)
    return {"input_ids": ids, "attention_mask": attn, "labels": lab,
            "position_ids": (attn.cumsum(1) - 1).clamp(min=0)}


def supervised_train(spec: ModelSpec, tokenizer: Any, template: PromptTemplate, sample: Sampler,
                     log: Any = None) -> LlamaForCausalLM:
    """Build a model from ``spec`` and train it on ``sample``'s worked solutions (AdamW, cosine);
    deterministic per seed."""
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(spec.llama_config(tokenizer))
    opt = torch.optim.AdamW(model.parameters(), lr=spec.sft_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.sft_lr, total_steps=max(spec.sft_steps, 1),
                                                pct_start=0.1, anneal_strategy="cos")
    rng = random.Random(spec.seed)
    model.train()
    for step in range(spec.sft_steps):
        # Fresh problems every step (seed offset keeps them away from the evaluation seeds).
        batch = _sft_batch(sample(spec.sft_batch, 10_000_000 + spec.seed * 100_000 + step),
                           tokenizer, template, rng, spec.hint_fraction)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log is not None and (step + 1) % max(spec.sft_steps // 5, 1) == 0:
            log(f"  sft step {step + 1}/{spec.sft_steps} loss {loss.item():.3f}")
    model.eval()
    return model


def trained_model(role: str, spec: ModelSpec, tokenizer: Any, template: PromptTemplate,
                  cache_dir: Optional[str], sample: Sampler, task_key: str, log: Any = print) -> str:
    """Return the path of ``role``'s trained model, training and caching it on first use.

    ``task_key`` (the task's name and version) is part of the cache key, so a changed task never
    reuses another task's (or an older version's) weights.
    """
    root = cache_dir or default_cache_dir()
    path = os.path.join(root, f"{task_key}-{role}-{spec.cache_key(tokenizer, template, task_key)}")
    if os.path.isfile(os.path.join(path, "DONE")):
        log(f"{role}: cached at {path}")
        return path
    log(f"{role}: supervised training ({spec.sft_steps} steps, hidden {spec.hidden_size}, "
        f"{spec.num_layers} layers) -> {path}")
    model = supervised_train(spec, tokenizer, template, sample, log=log)
    tmp = path + f".tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, "DONE"), "w") as fh:
        fh.write(json.dumps(asdict(spec)))
    # Rename last: a run killed mid-save never leaves a half-written cache entry behind.
    if os.path.isdir(path):
        import shutil

        shutil.rmtree(path)
    os.replace(tmp, path)
    return path
