"""The vocabulary-parallel routed loss: ``routed_loss(..., vocab_group=g)`` with the output projections split by
vocabulary rows over a tensor-parallel group (Megatron-LM's ``VocabParallelEmbedding`` / output layer layout).

Each rank holds a contiguous shard of rows (sizes may differ, in the group's rank order); hidden states, ids,
mask and hard labels are replicated. No rank ever holds an N x V tensor or another rank's weights: per token
the ranks exchange O(K x ranks) values (``bench/vocab_parallel.py`` predicts the bytes), and every rank ends
with the same loss, routes, per-token fields and metrics as one process on the concatenated weights.

Stages (files):
    validate.py  the checks, made collective (one all-gather of a short row per rank): shard sizes, error
                 flags, checksums of the replicated inputs (``check_values``)
    stats.py     self / teacher statistics on the shard (``linear_stats`` or the Triton statistics kernel)
                 + one all-gather of 4 values per token -> log-sum-exps and target log-probs over V
    (routing)    ``routing.route_tokens``, shared with every path; ``RouteConfig.stats_group`` pools its
                 statistics over data-parallel ranks, independently of the vocabulary group
    losses.py    full-support rows: shard logits + one all-gather (lse, picked logits) per chunk + an
                 all-reduce of the divergence's per-row sums; top-K rows: merge of the shards' top-K
                 candidates (``comm.merge_topk``), the student's logits at the K ids from their owners
                 (all-reduce), the loss replicated, the gradient folded into owned rows only
    loss.py      the orchestration; d hidden summed over the group unless ``reduce_hidden_grad=False``
    comm.py      the collectives (torch.distributed only) and the traffic counter
    ops.py, triton_ops.py   the per-shard compute (torch, or the Triton kernels)
    reference.py the float64 oracle: all-gathers the weights
"""

from .layout import ShardLayout
from .loss import vocab_parallel_routed_loss
from .reference import sharded_reference
from .validate import validate_sharded

__all__ = ["ShardLayout", "vocab_parallel_routed_loss", "sharded_reference", "validate_sharded"]
