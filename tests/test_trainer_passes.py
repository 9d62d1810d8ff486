"""Response-position alignment: log-probs from the trainer's hidden states equal a direct full forward."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dopd.passes import build_pass_batch, left_pad, output_projection, response_hidden
from dopd.rollout import response_mask

PAD, EOS = 0, 2


def _tiny_llama(seed: int, vocab: int = 40, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=PAD, eos_token_id=EOS, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def _case():
    g = torch.Generator().manual_seed(0)
    # Prompts of different lengths, and privileged contexts of yet other lengths.
    prompts = [torch.randint(3, 40, (n,), generator=g).tolist() for n in (3, 9, 5)]
    privileged = [p + torch.randint(3, 40, (k,), generator=g).tolist() for p, k in zip(prompts, (7, 1, 12))]
    lengths = (6, 2, 4)  # response lengths, EOS included; the batch is right-padded to 6
    responses = torch.full((3, 6), PAD, dtype=torch.long)
    for i, n in enumerate(lengths):
        responses[i, : n - 1] = torch.randint(3, 40, (n - 1,), generator=g)
        responses[i, n - 1] = EOS
    return prompts, privileged, responses, lengths


def _direct_logprobs(model, context, response):
    """Unpadded single-sequence forward with full logits: log p(response token t | context, response<t)."""
    ids = torch.tensor([context + response], dtype=torch.long)
    logits = model(input_ids=ids).logits[0].float()
    pos = torch.arange(len(context) - 1, len(context) - 1 + len(response))
    return torch.log_softmax(logits[pos], -1).gather(-1, torch.tensor(response)[:, None])[:, 0]


def test_response_mask_stops_after_first_eos():
    toks = torch.tensor([[5, EOS, 7, EOS], [5, 6, 7, 8], [EOS, 1, 1, 1]])
    assert response_mask(toks, [EOS]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_left_pad():
    ids, attn = left_pad([[1, 2], [3]], PAD)
    assert ids.tolist() == [[1, 2], [PAD, 3]] and attn.tolist() == [[1, 1], [0, 1]]


def test_hidden_state_logprobs_match_full_forward():
    prompts, privileged, responses, lengths = _case()
    mask = response_mask(responses, [EOS])
    for model, contexts in ((_tiny_llama(1), prompts), (_tiny_llama(2, vocab=48, hidden=48), privileged)):
        batch = build_pass_batch(contexts, responses, mask, PAD)
        with torch.no_grad():
            hidden = response_hidden(model, batch)
        weight, bias = output_projection(model)
        assert hidden.shape == (3, 6, model.config.hidden_size)
        logp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, responses[..., None])[..., 0]
        for i, n in enumerate(lengths):
            want = _direct_logprobs(model, contexts[i], responses[i, :n].tolist())
            torch.testing.assert_close(logp[i, :n], want, atol=1e-5, rtol=1e-5)


def test_student_and_privileged_passes_share_response_positions():
    """Both passes put response token t at position t, whatever their context widths."""
    prompts, privileged, responses, _ = _case()
    mask = response_mask(responses, [EOS])
    s = build_pass_batch(prompts, responses, mask, PAD)
    p = build_pass_batch(privileged, responses, mask, PAD)
    assert s.start != p.start
    for b in (s, p):
        # The input right after the hidden state at start + t is response token t (for t >= 1).
        assert torch.equal(b.input_ids[:, b.start + 1:], responses[:, :-1])
        # Position ids count only real tokens: left padding shifts nothing.
        assert b.position_ids[torch.arange(3), b.start].tolist() == [len(c) - 1 for c in
                                                                     (prompts if b is s else privileged)]
