// CPU kernels of the dopd ops on raw pointers (the torch-facing glue and checks are in ops.cpp).
// fp32 throughout; rows are parallelized with at::parallel_for (ATen's OpenMP pool), the inner loops use
// at::vec (AVX512 / AVX2 / scalar, chosen when the extension is built).
#pragma once

#include <cstdint>

#include "../kinds.h"

namespace dopd::cpu {

// Per row r of z (rows x vocab, row stride `stride`): with x = scale * z[r],
//   lse[r] = logsumexp(x), target_logit[r] = x[targets[r]] (NaN when the id is outside [0, vocab)),
//   the k largest x in descending order (exact ties: lower id first) into topk_vals / topk_idx (rows x k).
// Entries that are -inf (or NaN) are taken only when a row has fewer than k larger ones, lowest id first.
void row_stats(const float* z, int64_t rows, int64_t vocab, int64_t stride, const int64_t* targets, int64_t k,
               float scale, float* lse, float* target_logit, float* topk_vals, int64_t* topk_idx);

// Per row r, with ls = log_softmax(scale * student[r]) and lt = log_softmax(scale * source[r]):
//   value[r] = D(ls, lt) (kind, beta), target_logprob[r] = ls[targets[r]] (NaN outside [0, vocab)),
//   student[r] <- grad_scale[r] * dD/d student[r] (the chain factor `scale` included); source[r] is scratch.
// softcap > 0: student holds soft-capped logits t = softcap * tanh(u / softcap) and the gradient is taken with
// respect to u (times 1 - (t / softcap)^2; 0 at -inf entries).
void full_divergence(float* student, float* source, int64_t rows, int64_t vocab, int64_t stride_s,
                     int64_t stride_t, const int64_t* targets, Kind kind, float beta, float scale, float softcap,
                     const float* grad_scale, float* value, float* target_logprob);

// Per row r = rows[i] of hidden, idx and source_logits (rows: distinct ids into the n_hidden rows of each), the
// student's logits at the source's top-K ids,
// z[r, j] = scale * T(hidden[r] . weight[idx[r, j]] + bias[idx[r, j]]) with the model's logit transform
// T(y) = softcap * tanh(logit_scale * y / softcap) (softcap > 0, -inf kept) or logit_scale * y, and ls / lt the
// log-softmaxes over the K entries of z[r] and source_logits[r]:
//   value[i] = D(ls, lt); hidden_grad[r] += grad_scale[i] * dD/d hidden (when not null);
//   weight_grad[idx[r, j]] += grad_scale[i] * dD/d weight[idx[r, j]] (and bias_grad alike) when not null.
// idx must hold ids in [0, vocab) and rows distinct ids in [0, n_hidden) (checked by the caller). weight_grad is
// accumulated without races: the (row, j) pairs are bucketed by vocabulary id and each id is owned by one thread
// (deterministic order).
void topk_divergence(const float* hidden, int64_t hidden_size, const int64_t* rows, int64_t n_rows,
                     const float* weight, int64_t vocab, int64_t stride_w, const float* bias, const int64_t* idx,
                     int64_t k, const float* source_logits, Kind kind, float beta, float scale, float logit_scale,
                     float softcap, const float* grad_scale, float* value, float* hidden_grad, float* weight_grad,
                     float* bias_grad);

}  // namespace dopd::cpu
