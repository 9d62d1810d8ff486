"""Per-shard compute of the vocabulary-parallel loss on the Triton kernels (``backend="triton"``).

The same methods as ``ops.TorchShardOps``, on the single-process Triton path's kernels, each run on this
rank's rows only: ``stats.fused_linear_stats`` (fused GEMM, online log-sum-exp, target logit, streaming
top-K), ``matmul.matmul_into`` (a chunk's logits and the d hidden / d W GEMMs of full-support rows, fp32
accumulation, the weights read in their own dtype: no fp32 copy of the shard) and ``topk.gather_logits`` /
``topk.scatter_grad`` (the student's logits at K ids and their gradients, no (C, K, H) block). The exchange
between ranks and the per-row loss arithmetic stay in torch (``losses.py``): the single-process
full-support row kernel needs the whole row's sums inside one program, which a vocabulary shard does not
have. Logit transforms as on the single-process Triton path: in the statistics kernel's and the logit
GEMM's epilogues (``triton/softcap.py``); the raw logits at K ids are transformed in torch (``losses.py``).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..chunked_losses import GradBuffers, Projection
from ..chunked_stats import LinearStats
from ..transform import LogitTransform
from ..triton.blocks import blocks_for
from ..triton.matmul import matmul_into
from ..triton.softcap import kernel_transform
from ..triton.stats import fused_linear_stats
from ..triton.topk import gather_logits, scatter_grad

Tensor = torch.Tensor


class TritonShardOps:
    """The shard's compute on the Triton kernels; results in float32."""

    name = "triton"

    def __init__(self, device: torch.device, inv_tau: float) -> None:
        self.dtype = torch.float32
        self.inv_tau = inv_tau
        self.blocks = blocks_for(device)

    def projection(self, weight: Tensor, bias: Optional[Tensor], transform: LogitTransform) -> Projection:
        """The shard's projection as given (the kernels read bf16/fp16 weights directly)."""
        weight = weight.detach()
        return Projection(weight if weight.stride(1) == 1 else weight.contiguous(),
                          None if bias is None else bias.detach(), transform)

    def hidden(self, h: Tensor) -> Tensor:
        """Rows of hidden states as the kernels want them (contiguous, their own dtype)."""
        return h.contiguous()

    def stats(self, hidden: Tensor, proj: Projection, local_targets: Tensor, top_k: int) -> LinearStats:
        """As ``TorchShardOps.stats``, with the fused statistics kernel."""
        return fused_linear_stats(hidden, proj.weight, proj.bias, local_targets, vocab=proj.weight.shape[0],
                                  inv_tau=self.inv_tau, top_k=top_k, transform=proj.transform)

    def _count(self, rows: int, device: torch.device) -> Tensor:
        return torch.full((1,), rows, dtype=torch.int32, device=device)  # every row of the chunk is live

    def logits(self, h: Tensor, proj: Projection) -> Tensor:
        """(C, V_r) fp32 ``transform(h W^T + b) / tau`` with the Triton GEMM (the transform in its epilogue)."""
        out = torch.empty(h.shape[0], proj.weight.shape[0], dtype=torch.float32, device=h.device)
        matmul_into(out, h, proj.weight.T, blocks=self.blocks, count=self._count(h.shape[0], h.device), row0=0,
                    limit="m", bias=proj.bias, transform=kernel_transform(proj.transform, self.inv_tau))
        return out

    def _operand(self, proj: Projection) -> Optional[torch.dtype]:
        dtype = proj.weight.dtype
        return dtype if dtype in (torch.bfloat16, torch.float16) else None

    def fold_full(self, dz: Tensor, h: Tensor, proj: Projection, grads: GradBuffers) -> Optional[Tensor]:
        """As ``TorchShardOps.fold_full``, with the Triton GEMM (fp32 accumulators; fp16 operands scaled by a
        power of two from the chunk's max |dz|, as on one process, so that small gradients survive)."""
        count = self._count(h.shape[0], h.device)
        op = self._operand(proj)
        amax = dz.abs().amax().reshape(1) if op == torch.float16 else None
        if grads.weight is not None:
            matmul_into(grads.weight, dz.T, h, blocks=self.blocks, count=count, row0=0, limit="k", accumulate=True,
                        operand_dtype=op, a_amax=amax)
        if grads.bias is not None:
            grads.bias.add_(dz.sum(0))
        if grads.hidden is None:
            return None
        d_hidden = torch.zeros(h.shape[0], proj.weight.shape[1], dtype=torch.float32, device=h.device)
        matmul_into(d_hidden, dz, proj.weight, blocks=self.blocks, count=count, row0=0, limit="m",
                    operand_dtype=op, a_amax=amax)
        return d_hidden

    def raw_logits_at(self, h: Tensor, local_ids: Tensor, proj: Projection) -> tuple[Tensor, None]:
        """(C, K) fp32 ``h . W[ids] + b[ids]`` with the gather kernel (temperature applied later, in torch)."""
        on = torch.ones(local_ids.shape[0], dtype=torch.bool, device=h.device)
        return gather_logits(h, proj.weight, proj.bias, local_ids, on, 1.0, self.blocks), None

    def fold_topk(self, dz: Tensor, h: Tensor, local_ids: Tensor, saved: None, proj: Projection,
                  grads: GradBuffers) -> Optional[Tensor]:
        """As ``TorchShardOps.fold_topk``, with the scatter kernel (fp32 atomics into d W / d b)."""
        d_hidden = (torch.zeros(h.shape[0], proj.weight.shape[1], dtype=torch.float32, device=h.device)
                    if grads.hidden is not None else None)
        on = torch.ones(local_ids.shape[0], dtype=torch.bool, device=h.device)
        scatter_grad(dz.contiguous(), h, proj.weight, local_ids, on,
                     {"hidden": d_hidden, "weight": grads.weight, "bias": grads.bias}, self.blocks)
        return d_hidden
