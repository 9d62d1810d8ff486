"""The three forward passes to last hidden states, aligned on response positions.

Alignment. The student context (prompt) and the privileged context (prompt + hint) have different
lengths, and prompts differ in length across the batch. Each pass builds its own batch as

    [ left-padded contexts (width W) | responses[:, :-1] (right-padded) ]

so that in every row the context ends at column W - 1 and response token t sits at column W + t.
The hidden state at column W - 1 + t predicts response token t; slicing columns W - 1 .. W - 2 + R
gives a (B, R, H) tensor whose position t is response token t in every pass, whatever W is. Position
ids are ``cumsum(attention_mask) - 1``, so left padding shifts nothing; padded columns are masked out
of attention, and right padding after a response only follows (causally) the positions we read.

The passes call the base model (``model.<base_model_prefix>``) and return hidden states, never logits:
the routed loss multiplies by the output projection itself, so no (B, R, V) tensor is made here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists to one width: ``(ids, attention_mask)``, both (B, W) int64."""
    if not seqs:
        raise ValueError("no sequences to pad")
    width = max(len(s) for s in seqs)
    if width == 0:
        raise ValueError("empty context: every prompt must have at least one token")
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            attn[i, width - len(s):] = 1
    return ids, attn


@dataclass
class PassBatch:
    """Model inputs for one pass plus ``start``: the column of the hidden state predicting response token 0."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    start: int
    num_response: int

    def to(self, device: torch.device) -> "PassBatch":
        """Move the tensors to ``device``."""
        return PassBatch(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device),
                         self.start, self.num_response)


def build_pass_batch(contexts: Sequence[Sequence[int]], responses: torch.Tensor, response_mask: torch.Tensor,
                     pad_id: int) -> PassBatch:
    """Concatenate left-padded ``contexts`` with ``responses`` (B, R) as described in the module docstring."""
    if len(contexts) != responses.shape[0]:
        raise ValueError(f"{len(contexts)} contexts but {responses.shape[0]} responses")
    ctx_ids, ctx_attn = left_pad(contexts, pad_id)
    num_resp = responses.shape[1]
    # The last response token is never an input: nothing after it is predicted.
    resp_in = responses[:, : num_resp - 1]
    resp_attn = response_mask[:, : num_resp - 1].long()
    input_ids = torch.cat([ctx_ids, resp_in.long()], dim=1)
    attn = torch.cat([ctx_attn, resp_attn], dim=1)
    position_ids = (torch.cumsum(attn, dim=1) - 1).clamp(min=0)
    return PassBatch(input_ids, attn, position_ids, start=ctx_ids.shape[1] - 1, num_response=num_resp)


def base_model(model: Any) -> torch.nn.Module:
    """The transformer body of a causal LM (``LlamaForCausalLM.model`` and the like)."""
    body = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if body is None or body is model:
        raise ValueError(f"cannot find the base model of {type(model).__name__}")
    return body


def output_projection(model: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The lm_head ``(weight (V, H), bias or None)`` the loss multiplies the hidden states by."""
    cfg = getattr(model, "config", None)
    # These models post-process logits in ways a bare hidden @ weight.T would silently drop.
    for attr in ("final_logit_softcapping", "logit_scale"):
        if cfg is not None and getattr(cfg, attr, None) not in (None, 1.0):
            raise ValueError(f"{type(model).__name__} uses {attr}={getattr(cfg, attr)}; the hidden-state loss "
                             "path does not support logit post-processing")
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def response_hidden(model: Any, batch: PassBatch) -> torch.Tensor:
    """Run the base model on ``batch`` and return the response-aligned last hidden states (B, R, H)."""
    out = base_model(model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            position_ids=batch.position_ids, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden[:, batch.start: batch.start + batch.num_response]
