"""Per-shard compute of the vocabulary-parallel loss on the PyTorch path: everything a rank does on its own
rows of the vocabulary, with no communication (the stages in ``losses.py`` call these between collectives).

The building blocks are the single-process path's: ``chunked_stats.linear_stats`` for the statistics,
``chunked_stats.scaled_logits`` for a chunk's logits (the model's ``LogitTransform`` applied; a bf16 shard
converted per block of rows, never copied whole), ``chunked_losses._fold_full_grad`` for the gradients
of full-support rows. The top-K rows work on the (row, k) pairs whose id this rank owns only
(``OwnedPairs``). ``triton_ops.TritonShardOps`` has the same methods on the Triton kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..chunked_losses import GradBuffers, Projection, _fold_full_grad
from ..chunked_stats import LinearStats, linear_stats, scaled_logits
from ..topk import ties_may_cross_cut
from ..transform import LogitTransform

Tensor = torch.Tensor


class TorchShardOps:
    """The shard's compute in torch, in ``dtype`` (float32, or float64 for float64 inputs).

    inv_tau: 1 / temperature. stats_chunk: tokens per chunk of the statistics pass. chunk_elems: the
    memory budget of one gathered (rows x K x Hs) block of projection rows, in elements (``chunk_size``
    x the shard's rows, like one chunk of logits).
    """

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

    def exact_ties(self, cases: list[tuple[Projection, int]]) -> list[bool]:
        """For each (shard projection, local top-k width): whether its top-K must break exact ties by the
        lower id (``topk.ties_may_cross_cut``: a soft-cap, or a shard bias with enough -inf entries); one host
        read on CUDA for all of them."""
        return ties_may_cross_cut([(p.bias, p.transform.softcap is not None, k) for p, k in cases])

    def stats(self, hidden: Tensor, proj: Projection, local_targets: Tensor, top_k: int,
              exact_ties: bool) -> LinearStats:
        """Log-sum-exp over the shard's rows, the logit at ``local_targets`` (in range; masked by the caller
        where another rank owns the id) and the shard's top-``top_k`` (local ids; ties to the lower id when
        ``exact_ties``, see ``exact_ties``)."""
        return linear_stats(hidden, proj.weight, proj.bias, local_targets, inv_tau=self.inv_tau, top_k=top_k,
                            chunk_size=self.stats_chunk, transform=proj.transform, dtype=self.dtype,
                            exact_ties=exact_ties)

    def logits(self, h: Tensor, proj: Projection) -> Tensor:
        """(C, V_r) ``transform(h W^T + b) / tau`` over the shard's rows; h (C, H) from ``hidden``."""
        return scaled_logits(h, proj.weight, proj.bias, self.inv_tau, proj.transform, self.dtype)

    def fold_full(self, dz: Tensor, h: Tensor, chunk: Tensor, proj: Projection, grads: GradBuffers) -> None:
        """d W += dz^T h, d b += sum(dz), and this shard's part of d hidden (dz W) into grads.hidden[chunk]:
        the single-process path's own fold (``chunked_losses._fold_full_grad``)."""
        _fold_full_grad(dz, h, chunk, proj, grads)

    def raw_logits_at(self, h: Tensor, local_ids: Tensor, owned: Tensor,
                      proj: Projection) -> tuple[Tensor, "OwnedPairs"]:
        """(C, K) raw logits ``h . W[ids] + b[ids]`` (no transform, no temperature) at the ids this rank owns,
        0 elsewhere; local_ids (C, K) in range, owned (C, K). Only the owned (row, k) pairs are computed (about
        1 / ranks of them; one host sync to find them, like the rest of the PyTorch path); they, and their
        gathered weight rows when those fit the memory budget, are returned for ``fold_topk``."""
        pairs = owned.nonzero()
        row, col = pairs[:, 0], pairs[:, 1]
        ids = local_ids[row, col]
        z = torch.zeros(local_ids.shape, dtype=self.dtype, device=h.device)
        step = self._step(h.shape[1])
        rows = None
        for start in range(0, ids.numel(), step):
            sl = slice(start, start + step)
            # embedding's gather is faster than advanced indexing on CPU
            rows = torch.nn.functional.embedding(ids[sl], proj.weight).to(self.dtype)
            val = (rows * h.index_select(0, row[sl])).sum(1)
            if proj.bias is not None:
                val += proj.bias.index_select(0, ids[sl])
            z[row[sl], col[sl]] = val
        return z, OwnedPairs(row, col, ids, rows if step >= ids.numel() else None)

    def fold_topk(self, dz: Tensor, h: Tensor, saved: "OwnedPairs", proj: Projection,
                  grads: GradBuffers) -> Optional[Tensor]:
        """Fold a (C, K) logit gradient, at the pairs ``raw_logits_at`` found owned (other ranks' entries are
        not read), into d W / d b rows; returns this shard's part of d hidden (C, H) or None."""
        d_hidden = torch.zeros_like(h) if grads.hidden is not None else None
        row, ids = saved.row, saved.ids
        g = dz[row, saved.col]
        step = self._step(h.shape[1])
        for start in range(0, ids.numel(), step):
            sl = slice(start, start + step)
            g_sl = g[sl, None]
            if grads.weight is not None:
                grads.weight.index_add_(0, ids[sl], g_sl * h.index_select(0, row[sl]))
            if grads.bias is not None:
                grads.bias.index_add_(0, ids[sl], g[sl])
            if d_hidden is not None:
                rows = saved.rows if saved.rows is not None else torch.nn.functional.embedding(
                    ids[sl], proj.weight).to(self.dtype)
                d_hidden.index_add_(0, row[sl], g_sl * rows)
        return d_hidden

    def _step(self, hs: int) -> int:
        """Owned pairs per block: (pairs x H) gathered rows within the memory budget."""
        return max(1, self.chunk_elems // max(1, hs))


@dataclass
class OwnedPairs:
    """The (row, k) pairs of a block whose id this rank owns: row (P,), col (P,), local ids (P,), and their
    gathered weight rows (P, H) in the compute dtype when one block held them all (else None)."""

    row: Tensor
    col: Tensor
    ids: Tensor
    rows: Optional[Tensor]
