"""Sampling responses from the student (on-policy rollouts) and greedy decoding for evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from transformers import GenerationConfig

from dopd.passes import left_pad


@dataclass
class Rollout:
    """Sampled responses, right-padded: ``tokens`` (B, R) and ``mask`` (B, R), True on real tokens.

    A response runs up to and including its first EOS (the student must learn to stop); positions
    after it hold the pad id and are masked out.
    """

    tokens: torch.Tensor
    mask: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        """Number of real tokens of each response."""
        return self.mask.sum(dim=1)


def response_mask(tokens: torch.Tensor, eos_ids: Sequence[int]) -> torch.Tensor:
    """True up to and including the first EOS of each row (all True when a row has no EOS)."""
    is_eos = torch.zeros_like(tokens, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= tokens == e
    # Number of EOS strictly before each position: 0 means the position is still inside the response.
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return before == 0


def _eos_ids(tokenizer: Any, model: Any) -> list[int]:
    """EOS ids from the tokenizer and the model's generation config (chat models often have several)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(int(e) for e in gen_eos)
    if not ids:
        raise ValueError("the tokenizer has no eos_token: responses would never end")
    return sorted(ids)


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> Rollout:
    """Generate one response per prompt (token ids, unpadded) with ``model.generate``.

    Prompts are left-padded so that every response starts in the same column; ``generate`` derives the
    position ids from the attention mask, so padding does not shift positions.
    """
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has no pad_token; set one (e.g. the eos token)")
    ids, attn = left_pad(prompts, pad_id)
    eos = _eos_ids(tokenizer, model)
    was_training = model.training
    model.eval()
    # Sample from the model's own distribution: a checkpoint's generation_config may carry
    # repetition_penalty, no_repeat_ngram_size, min_new_tokens, suppress_tokens... which generate()
    # would merge into any call. A bare config for the call's duration leaves only what we ask for.
    shipped_config = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        kwargs: dict[str, Any] = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                      eos_token_id=eos)
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0)  # top_k=0: no hidden top-k default
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), **kwargs)
    finally:
        model.generation_config = shipped_config
        model.train(was_training)
    tokens = out[:, ids.shape[1]:].cpu()
    if tokens.shape[1] == 0:  # cannot happen with max_new_tokens >= 1, but keep shapes valid
        tokens = torch.full((len(prompts), 1), pad_id, dtype=torch.long)
    mask = response_mask(tokens, eos)
    tokens = tokens.masked_fill(~mask, pad_id)
    return Rollout(tokens=tokens, mask=mask)
