"""Top-K with the project's tie rule: larger value first, and among equal values the lower vocabulary id.

``torch.topk`` leaves the choice among equal values at the cut unspecified (on the CPU it depends on
the heap order, so a chunk and the full tensor may pick different ids). Raw logits from a GEMM almost
never tie, but a soft-cap saturates: every logit far above the cap becomes exactly ``softcap``, and the
source's top-K then depends on the tie rule. The Triton kernels, the reference and the PyTorch path for
soft-capped sources all use this rule, so they pick the same ids.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def topk_lower_id(z: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Values and ids of the ``k`` largest entries of each row of ``z`` (R, V), ties to the lower id.

    The ids within a row are not sorted (every consumer reduces over K). V < 2**24 (the keys are
    floats in z's dtype; float32 or float64).
    Cost: two ``torch.topk`` and four elementwise passes over R x V.
    """
    kth = torch.topk(z, k, dim=1).values[:, -1:]  # the value at the cut (sorted: the last one)
    # A key that is +inf above the cut, V - id at the cut and 0 below: its top-K is everything above
    # the cut plus the lowest ids at the cut (fewer than k entries are above it, at least k are >= it).
    ids_desc = torch.arange(z.shape[1], 0, -1, dtype=z.dtype, device=z.device)
    key = (z == kth).to(z.dtype).mul_(ids_desc)
    key.masked_fill_(z > kth, float("inf"))
    idx = torch.topk(key, k, dim=1, sorted=False).indices
    return z.gather(1, idx), idx
