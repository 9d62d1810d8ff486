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
What a model does to ``hidden @ W^T + b`` before its softmax (a multiplier, a final soft-cap) is read
from its config by :func:`logit_transform` and handed to the loss; a model whose post-processing the
loss cannot reproduce is refused (before its weights load), never trained on different logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch

if TYPE_CHECKING:
    from dopd_kernels import LogitTransform


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
    """The lm_head ``(weight (V, H), bias or None)`` the loss multiplies the hidden states by.

    Whatever the model does to ``hidden @ weight.T + bias`` afterwards is :func:`logit_transform`'s job.
    """
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(f"{type(model).__name__} has no output projection (get_output_embeddings() is None)")
    return head.weight, getattr(head, "bias", None)


#: Logit multipliers a transformers config may carry, and how its model applies them. The first four are
#: the settings TRL's DistillationTrainer reads; the model code in transformers is the authority.
_SCALES = (
    ("logit_scale", "multiply"),  # Cohere, Cohere2: logits * logit_scale
    ("output_multiplier", "multiply"),  # MuseGlimmer / MuseSpark: before the final soft-cap
    ("lm_head_multiplier", "multiply"),  # Falcon-H1: lm_head(h) * lm_head_multiplier
    ("logits_scaling", "divide"),  # Granite family: logits / s; MiniCPM3: h / s before a bias-free head
    ("logits_mup_width_multiplier", "divide"),  # Inkling: h / m before the head
)
#: Final soft-caps ``cap * tanh(z / cap)``: Gemma 2/3/3n (text_config for the multimodal ones), VaultGemma,
#: Nanochat; RecurrentGemma calls it logits_soft_cap, xLSTM output_logit_soft_cap.
_SOFTCAPS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")


def _setting(config: Any, text: Any, name: str) -> Any:
    """``name`` from the text config (where multimodal models keep it), else from the top-level config."""
    value = getattr(text, name, None)
    return getattr(config, name, None) if value is None and text is not config else value


def logit_transform(config: Any, name: Optional[str] = None) -> "LogitTransform":
    """The exact logit post-processing of the model ``config`` describes, read from the config alone.

    Reads every setting through ``config.get_text_config()`` (multimodal configs keep them there):
    ``logit_scale``, ``output_multiplier``, ``lm_head_multiplier`` (multipliers), ``logits_scaling``
    (a divisor; HyperCLOVA X multiplies by it), ``logits_mup_width_multiplier`` (a divisor) and the final
    soft-caps. Returns ``LogitTransform(scale, softcap)`` (the identity when none is set), or raises a
    ValueError naming the model and the setting when the model post-processes its logits in a way the
    transform cannot express or the setting is ambiguous: training on logits the model never produces
    would be silently wrong. No weights are needed, so the trainer calls this before loading any.
    """
    from dopd_kernels import LogitTransform

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", None) or getattr(config, "model_type", None) or "?"
    who = f"{model_type} model {name}" if name else f"{model_type} model"

    def refuse(setting: str, why: str) -> ValueError:
        return ValueError(f"{who}: {setting}: {why}; the trainer cannot reproduce this model's logits, so it refuses "
                          "the model rather than train on different ones")

    def number(setting: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise refuse(f"{setting}={value!r}", "expected a finite number > 0")
        return float(value)

    # Settings the transform cannot express, or that the class AutoModelForCausalLM loads ignores.
    if getattr(config, "model_type", None) == "gemma3" and _setting(config, text, "final_logit_softcapping") is not None:
        raise refuse(f"text_config.final_logit_softcapping={_setting(config, text, 'final_logit_softcapping')!r}",
                     "Gemma3ForConditionalGeneration ignores it while Gemma3ForCausalLM applies it (ambiguous)")
    if model_type == "mpt" and _setting(config, text, "logit_scale") is not None:
        raise refuse(f"logit_scale={_setting(config, text, 'logit_scale')!r}",
                     "transformers' MPT ignores it while the original MPT code applies it (ambiguous)")
    if model_type != "minicpm3":  # MiniCPM3 exposes its dim_model_base as logits_scaling (read below)
        for setting in ("dim_model_base", "scale_width"):
            if _setting(config, text, setting) is not None:
                raise refuse(f"{setting}={_setting(config, text, setting)!r}",
                             "the hidden states are rescaled before the output projection in a family-specific way")
    unpadded, vocab = _setting(config, text, "unpadded_vocab_size"), getattr(text, "vocab_size", None)
    if unpadded is not None and unpadded != vocab:
        raise refuse(f"unpadded_vocab_size={unpadded!r}", f"the logits are cut to fewer entries than the {vocab} "
                     "output-projection rows")

    scales = []
    for setting, how in _SCALES:
        value = _setting(config, text, setting)
        if value is None:
            continue
        value = number(setting, value)
        if how == "divide" and model_type != "hyperclovax":  # HyperCLOVA X multiplies by logits_scaling
            value = 1.0 / value
        if value != 1.0:
            scales.append((setting, value))
    if len(scales) > 1:
        raise refuse(" and ".join(s for s, _ in scales), "more than one logit multiplier is set (ambiguous)")
    caps = [(s, number(s, _setting(config, text, s))) for s in _SOFTCAPS if _setting(config, text, s) is not None]
    if len(caps) > 1:
        raise refuse(" and ".join(s for s, _ in caps), "more than one final soft-cap is set (ambiguous)")
    return LogitTransform(scale=scales[0][1] if scales else 1.0, softcap=caps[0][1] if caps else None)


@torch.no_grad()
def verify_logit_transform(model: Any, transform: "LogitTransform", name: str, num_tokens: int = 8) -> None:
    """Check on a few tokens that ``transform(hidden @ W^T + b)`` reproduces the model's own logits.

    :func:`logit_transform` reads the post-processing that configs declare; this catches a family that
    does something else between its last hidden state and its logits (a rescaled hidden state, a cut
    vocabulary), after loading and before any training. Raises ValueError naming ``name``.
    """
    weight, bias = output_projection(model)
    device = weight.device
    ids = (torch.arange(num_tokens, device=device) * 7 + 3) % weight.shape[0]
    batch = PassBatch(ids[None], torch.ones_like(ids)[None], torch.arange(num_tokens, device=device)[None], 0,
                      num_tokens)
    hidden = response_hidden(model, batch)
    ours = transform.apply(torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias).float())
    theirs = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits.float()
    if theirs.shape != ours.shape:
        raise ValueError(f"{name}: the model's logits have shape {tuple(theirs.shape)} but its output projection "
                         f"gives {tuple(ours.shape)}: it post-processes logits in a way the trainer does not model")
    # The model rounds its logits and their post-processing in its own dtype (relative eps / 2 per op, and
    # log-softmax adds the log-sum-exp's error): 4 eps x |z|. A missing multiplier or cap is far larger.
    tol = 1e-4 + 4 * torch.finfo(weight.dtype).eps * float(ours.abs().max())
    err = float((ours.log_softmax(-1) - theirs.log_softmax(-1)).abs().max())
    if not err <= tol:
        raise ValueError(f"{name}: log-probs from the last hidden state and the output projection ({transform}) "
                         f"differ from the model's own by {err:.3g} (tolerance {tol:.3g}): the model post-processes "
                         "its logits in a way the trainer does not model")


def response_hidden(model: Any, batch: PassBatch) -> torch.Tensor:
    """Run the base model on ``batch`` and return the response-aligned last hidden states (B, R, H)."""
    out = base_model(model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            position_ids=batch.position_ids, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden[:, batch.start: batch.start + batch.num_response]
