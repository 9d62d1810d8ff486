"""Rollouts sample from the model's own distribution: a checkpoint's generation defaults do not leak in."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dopd.rollout import generate
from dopd.tasks.tokenizer import build_char_tokenizer


def test_shipped_generation_config_does_not_change_rollouts():
    tok = build_char_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)).eval()
    prompts = [tok("3, add 3 mod 10, 2 times", add_special_tokens=False)["input_ids"]]
    plain = generate(model, tok, prompts, max_new_tokens=16, do_sample=False)
    model.generation_config.repetition_penalty = 5.0  # as some checkpoints ship (e.g. 1.05)
    model.generation_config.no_repeat_ngram_size = 1
    again = generate(model, tok, prompts, max_new_tokens=16, do_sample=False)
    assert torch.equal(plain.tokens, again.tokens)
    assert model.generation_config.repetition_penalty == 5.0  # restored for the caller
