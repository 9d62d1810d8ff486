"""Per-shard compute of the vocabulary-parallel loss on the PyTorch path: everything a rank does on its own
rows of the vocabulary, with no communication (the stages in ``losses.py`` call these between collectives).

The building blocks are the single-process path's: ``chunked_stats.linear_stats`` for the statistics,
``chunked_stats.scaled_logits`` for a chunk's logits (the model's ``LogitTransform`` applied; a bf16 shard
converted per block of rows, never copied whole), ``chunked_stats.logits_grad_to_hidden`` and
``chunked_losses.fold_topk_grad`` for the gradients. ``triton_ops.TritonShardOps`` has the same
methods on the Triton kernels.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..chunked_losses import GradBuffers, Projection, fold_topk_grad
from ..chunked_stats import LinearStats, linear_stats, logits_grad_to_hidden, scaled_logits
from ..transform import LogitTransform

Tensor = torch.Tensor


class TorchShardOps:
    """The shard's compute in torch, in ``dtype`` (float32, or float64 for float64 inputs).

    inv_tau: 1 / temperature. stats_chunk: tokens per chunk of the statistics pass. chunk_elems: the
    memory budget of one gathered (rows x K x Hs) block of projection rows, in elements (``chunk_size``
    x the shard's rows, like one chunk of logits).
    """

    name = "torch"

    def __init__(self, dtype: torch.dtype, inv_tau: float, stats_chunk: int, chunk_elems: int) -> None:
        self.dtype = dtype
        self.inv_tau = inv_tau
        self.stats_chunk = stats_chunk
        self.chunk_elems = chunk_elems

    def projection(self, weight: Tensor, bias: Optional[Tensor], transform: LogitTransform) -> Projection:
        """A shard's projection: the weight as stored (the GEMMs convert bf16 per block), the bias in the
        compute dtype."""
        return Projection(weight.detach(), None if bias is None else bias.detach().to(self.dtype), transform,
                          self.dtype)

    def hidden(self, h: Tensor) -> Tensor:
        """Rows of hidden states as the GEMMs want them (the compute dtype)."""
        return h.to(self.dtype)

    def stats(self, hidden: Tensor, proj: Projection, local_targets: Tensor, top_k: int) -> LinearStats:
        """Log-sum-exp over the shard's rows, the logit at ``local_targets`` (in range; masked by the caller
        where another rank owns the id) and the shard's top-``top_k`` (local ids)."""
        return linear_stats(hidden, proj.weight, proj.bias, local_targets, inv_tau=self.inv_tau, top_k=top_k,
                            chunk_size=self.stats_chunk, transform=proj.transform, dtype=self.dtype)

    def logits(self, h: Tensor, proj: Projection) -> Tensor:
        """(C, V_r) ``transform(h W^T + b) / tau`` over the shard's rows; h (C, H) from ``hidden``."""
        return scaled_logits(h, proj.weight, proj.bias, self.inv_tau, proj.transform, self.dtype)

    def fold_full(self, dz: Tensor, h: Tensor, proj: Projection, grads: GradBuffers) -> Optional[Tensor]:
        """d W += dz^T h, d b += sum(dz) in place; returns this shard's part of d hidden (dz W) or None."""
        if grads.weight is not None:
            grads.weight.addmm_(dz.T, h)
        if grads.bias is not None:
            grads.bias.add_(dz.sum(0))
        return logits_grad_to_hidden(dz, proj.weight) if grads.hidden is not None else None

    def _blocks(self, rows: int, k: int, hs: int) -> int:
        return max(1, self.chunk_elems // max(1, k * hs)) if rows else 1

    def raw_logits_at(self, h: Tensor, local_ids: Tensor, proj: Projection) -> tuple[Tensor, Optional[Tensor]]:
        """(C, K) raw logits ``h . W[ids] + b[ids]`` (no transform, no temperature) at local ids in range, and
        the gathered rows (C, K, H) when they fit the memory budget (``fold_topk`` reuses them)."""
        step = self._blocks(*local_ids.shape, h.shape[1])
        z = torch.empty(local_ids.shape, dtype=self.dtype, device=h.device)
        rows = None
        for start in range(0, local_ids.shape[0], step):
            sl = slice(start, start + step)
            # embedding's gather is faster than advanced indexing on CPU
            rows = torch.nn.functional.embedding(local_ids[sl], proj.weight).to(self.dtype)
            z[sl] = torch.bmm(rows, h[sl, :, None]).squeeze(2)
            if proj.bias is not None:
                z[sl] += proj.bias[local_ids[sl]]
        return z, rows if step >= local_ids.shape[0] else None

    def fold_topk(self, dz: Tensor, h: Tensor, local_ids: Tensor, saved: Optional[Tensor], proj: Projection,
                  grads: GradBuffers) -> Optional[Tensor]:
        """Fold a (C, K) logit gradient (0 at ids other ranks own) into d W / d b rows; returns this shard's
        part of d hidden (C, H) or None."""
        step = self._blocks(*local_ids.shape, h.shape[1])
        d_hidden = torch.empty_like(h) if grads.hidden is not None else None
        for start in range(0, local_ids.shape[0], step):
            sl = slice(start, start + step)
            rows = saved if saved is not None else torch.nn.functional.embedding(
                local_ids[sl], proj.weight).to(self.dtype)
            part = fold_topk_grad(dz[sl], h[sl], rows, local_ids[sl], grads.weight, grads.bias)
            if d_hidden is not None:
                d_hidden[sl] = part
        return d_hidden
