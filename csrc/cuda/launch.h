// Launchers of the CUDA kernels (row_stats.cu, divergence.cu), on raw device pointers: no torch header on either
// side of this interface, so the .cu files compile as standalone CUDA translation units (the tests compile them for sm_90 with
// nvcc on a machine without a GPU). Each returns 0 or the cudaError_t of the launch; `stream` is a cudaStream_t.
// Contracts: as the CPU kernels (../cpu/kernels.h).
#pragma once

#include <cstdint>

#include "../kinds.h"

namespace dopd::cuda {

//: Largest K of row_stats on CUDA (the selected keys are sorted in shared memory).
constexpr int64_t kMaxTopK = 4096;

int row_stats(const float* z, int64_t rows, int64_t vocab, int64_t stride, const int64_t* targets, int64_t k,
              float scale, float* lse, float* target_logit, float* topk_vals, int64_t* topk_idx, void* stream);

int full_divergence(float* student, float* source, int64_t rows, int64_t vocab, int64_t stride_s, int64_t stride_t,
                    const int64_t* targets, Kind kind, float beta, float scale, float softcap,
                    const float* grad_scale, float* value, float* target_logprob, void* stream);

int topk_divergence(const float* hidden, int64_t n_hidden, int64_t hidden_size, const int64_t* rows, int64_t n_rows,
                    const float* weight, int64_t vocab, int64_t stride_w, const float* bias, const int64_t* idx, int64_t k,
                    const float* source_logits, Kind kind, float beta, float scale, float logit_scale,
                    float softcap, const float* grad_scale, float* value, float* hidden_grad, float* weight_grad,
                    float* bias_grad, void* stream);

const char* error_string(int code);

}  // namespace dopd::cuda
