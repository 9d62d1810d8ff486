"""Reduction of per-token losses: the per-token weights that turn them into the scalar loss.

    seq_mean   : mean over sequences with >= 1 valid token of (1/|y_b| * sum over valid n of L_n)
    token_mean : sum over valid tokens / their count
    sum        : sum over valid tokens
All three are linear in the per-token losses, so each is ``sum_n w_n L_n`` with the weights below;
the fused paths scale each token's gradient by ``w_n`` once instead of reducing afterwards.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def reduction_weights(valid: Tensor, reduction: str, dtype: torch.dtype = torch.float32) -> Tensor:
    """Weights w with loss = sum(w * per_token_loss). ``valid`` is (B, T) or (N,) bool (1-D = one sequence).

    Returns a tensor shaped like ``valid``, 0 at invalid tokens. Stays on the device (no host sync);
    an all-invalid batch gives all-zero weights, so the loss is 0 with zero gradients.
    """
    v = valid.to(dtype)
    if reduction == "sum":
        return v
    if reduction == "token_mean":
        return v / v.sum().clamp_min(1.0)
    if reduction == "seq_mean":
        rows = v if v.dim() == 2 else v.unsqueeze(0)
        per_seq = rows.sum(-1, keepdim=True)  # |y_b|
        n_seqs = (per_seq > 0).to(dtype).sum().clamp_min(1.0)
        return (rows / (per_seq.clamp_min(1.0) * n_seqs)).reshape(valid.shape)
    raise ValueError(f"reduction must be one of 'seq_mean', 'token_mean', 'sum', got {reduction!r}")
