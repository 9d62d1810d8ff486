"""Tiny models, prompts and fixed completions for the TRL integration tests (and their 2-process worker).

The models are the embedded task's tiny Llamas (``dopd.tasks.default.SPECS["tiny"]``, the character
tokenizer), randomly initialised with a wide initializer so that the three passes disagree and every
route is hit. ``fix_completions`` replaces sampling by given completions, so that a trainer's batch is
known exactly while the rest of TRL's batch building (tokenization, padding, counts) runs as in training.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from transformers import LlamaForCausalLM

from dopd.tasks.chain import make_problems
from dopd.tasks.default import SPECS
from dopd.tasks.tokenizer import build_char_tokenizer

TEMPLATE = "{prompt}\n\n{privileged_context}"


def tokenizer() -> Any:
    return build_char_tokenizer()


def tiny_llama(role: str, tok: Any, seed: int, dtype: torch.dtype = torch.float64,
               vocab_multiple: Optional[int] = None) -> LlamaForCausalLM:
    """A tiny Llama of ``role`` ("student" / "teacher"): random weights, std 0.3 (logits of a few nats)."""
    spec = SPECS["tiny"][role]
    if vocab_multiple is not None:
        spec = dataclasses.replace(spec, vocab_multiple=vocab_multiple)
    config = spec.llama_config(tok)
    config.initializer_range = 0.3
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype)


def examples(n: int, seed: int = 0, empty_every: int = 0) -> list[dict[str, str]]:
    """``n`` task examples (prompt, privileged_context); every ``empty_every``-th has an empty context."""
    rows = []
    for i, p in enumerate(make_problems(n, seed)):
        empty = empty_every and i % empty_every == empty_every - 1
        rows.append({"prompt": p.prompt, "privileged_context": "" if empty else p.privileged})
    return rows


def completions(n: int, vocab: int, seed: int = 0, lengths: Optional[list[int]] = None) -> list[list[int]]:
    """Ragged completions of ordinary tokens (ids 4..vocab-1: no pad/bos/eos/unk)."""
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [int(x) for x in torch.randint(2, 9, (n,), generator=g)]
    return [torch.randint(4, vocab, (k,), generator=g).tolist() for k in lengths]


def fix_completions(trainer: Any, fixed: list[list[int]]) -> None:
    """Make ``trainer`` 'sample' ``fixed`` (in prompt order) instead of generating."""
    def single_turn(prompt_ids, images, multimodal_fields, has_tool_images=False):
        assert len(prompt_ids) == len(fixed), (len(prompt_ids), len(fixed))
        return [list(c) for c in fixed]

    trainer._generate_single_turn = single_turn
