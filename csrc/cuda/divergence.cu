// CUDA kernels of dopd::full_divergence_ (512 threads) and dopd::topk_divergence (256 threads), one block per
// row: the closed forms of ../cpu/divergence.cpp (log-sum-exps in one read of both rows, then the value sums with
// s and the per-entry difference stored in place, then the gradient). topk_divergence computes its K logits with
// one warp per id and adds into d hidden and d W with atomics (one per (row, id, hidden column) for d W).
#include <cuda_runtime.h>

#include <cstdint>

#include "block.cuh"
#include "launch.h"

namespace dopd::cuda {
namespace {

using namespace detail;

constexpr int kRowThreads = 512;
constexpr int kTopkThreads = 256;

// The soft-cap's derivative 1 - (t / cap)^2 at a capped logit t (1 without a cap, 0 at -inf).
__device__ __forceinline__ float cap_factor(float t, float softcap) {
  if (softcap <= 0.f) return 1.f;
  if (t == -INFINITY) return 0.f;
  const float u = t / softcap;
  return 1.f - u * u;
}

// The divergence of one row pair over n entries (global or shared memory), by the whole block: as
// cpu::row_divergence. zs <- coef * dD/dzs (scale_s and the cap's derivative included), zt scratch; thread 0
// writes *target_logprob.
template <int T>
__device__ float block_divergence(float* zs, float* zt, int64_t n, float scale_s, float scale_t, Kind kind,
                                  float beta, float coef, float softcap, int64_t target, float* target_logprob,
                                  float* red_m, float* red_s) {
  const int tid = threadIdx.x;
  MaxSum ps{-INFINITY, 0.f}, pt{-INFINITY, 0.f};
  bool nan = false;
  for (int64_t i = tid; i < n; i += T) {
    const float a = __fmul_rn(scale_s, zs[i]), b = __fmul_rn(scale_t, zt[i]);  // never contracted into an FMA
    nan |= isnan(a) || isnan(b);
    online_add<true>(ps, a);
    online_add<true>(pt, b);
  }
  nan = __syncthreads_or(nan);
  ps = block_merge<T, true>(ps, red_m, red_s);
  pt = block_merge<T, true>(pt, red_m, red_s);
  // log_softmax(x) = (x - xmax) - logsum with x = scale * z rounded, as torch computes it (exact at the max)
  const float sum_s = nan ? NAN : (isinf(ps.m) ? 0.f : logf(ps.s));
  const float sum_t = nan ? NAN : (isinf(pt.m) ? 0.f : logf(pt.s));
  if (tid == 0 && target_logprob != nullptr) {
    *target_logprob = (target >= 0 && target < n) ? (__fmul_rn(scale_s, zs[target]) - ps.m) - sum_s : NAN;
  }
  __syncthreads();  // zs[target] is read before the sweep below overwrites it
  const float beta1 = 1.f - beta;
  float acc_s = 0.f, acc_t = 0.f;
  for (int64_t i = tid; i < n; i += T) {
    const float zi = zs[i];
    const float ls = (__fmul_rn(scale_s, zi) - ps.m) - sum_s;
    const float lt = (__fmul_rn(scale_t, zt[i]) - pt.m) - sum_t;
    const float s = expf(ls);  // accurate: s near 1 must be 1 (grad = s (d - value))
    // s is stored times the cap factor: the last sweep needs only the product
    if (kind == Kind::rkl) {
      const float d = s == 0.f ? 0.f : ls - lt;
      acc_s += s * d;
      zs[i] = s * cap_factor(zi, softcap);
      zt[i] = d;
    } else if (kind == Kind::fkl) {
      const float t = expf(lt);
      acc_t += t == 0.f ? 0.f : t * (lt - ls);
      zs[i] = coef * scale_s * (s - t) * cap_factor(zi, softcap);
    } else {
      const float t = expf(lt);
      const float lm = logf(fmaf(beta, t, beta1 * s));
      const float d = s == 0.f ? 0.f : ls - lm;
      acc_t += t == 0.f ? 0.f : t * (lt - lm);
      acc_s += s * d;
      zs[i] = s * cap_factor(zi, softcap);
      zt[i] = d;
    }
  }
  acc_s = block_sum<T>(acc_s, red_s);
  acc_t = block_sum<T>(acc_t, red_m);
  if (kind == Kind::fkl) return acc_t;
  // grad = c s (d - center): center = value (rkl) or sum s (ls - lm) (jsd); each thread rereads its own entries.
  const float c = coef * scale_s * (kind == Kind::rkl ? 1.f : beta1);
  for (int64_t i = tid; i < n; i += T) zs[i] = c * zs[i] * (zt[i] - acc_s);
  return kind == Kind::rkl ? acc_s : beta * acc_t + beta1 * acc_s;
}

__global__ void __launch_bounds__(kRowThreads)
    full_divergence_kernel(float* student, float* source, int64_t vocab, int64_t stride_s, int64_t stride_t,
                           const int64_t* __restrict__ targets, Kind kind, float beta, float scale, float softcap,
                           const float* __restrict__ grad_scale, float* __restrict__ value,
                           float* __restrict__ target_logprob) {
  __shared__ float red_m[kRowThreads / 32], red_s[kRowThreads / 32];
  const int64_t row = blockIdx.x;
  const float v = block_divergence<kRowThreads>(student + row * stride_s, source + row * stride_t, vocab, scale,
                                                scale, kind, beta, grad_scale[row], softcap, targets[row],
                                                target_logprob + row, red_m, red_s);
  if (threadIdx.x == 0) value[row] = v;
}

__global__ void __launch_bounds__(kTopkThreads)
    topk_divergence_kernel(const float* __restrict__ hidden, int64_t n_hidden, int64_t hidden_size,
                           const int64_t* __restrict__ rows,
                           const float* __restrict__ weight, int64_t vocab, int64_t stride_w,
                           const float* __restrict__ bias, const int64_t* __restrict__ idx, int k,
                           const float* __restrict__ source_logits, Kind kind, float beta, float scale,
                           float logit_scale, float softcap, const float* __restrict__ grad_scale,
                           float* __restrict__ value, float* hidden_grad, float* weight_grad, float* bias_grad) {
  constexpr int T = kTopkThreads;
  extern __shared__ float logits[];  // the student's k logits, then the source's
  float* zs = logits;
  float* zt = logits + k;
  __shared__ float red_m[T / 32], red_s[T / 32];
  const int64_t r = blockIdx.x;
  const int64_t hidden_row = rows[r];
  if (hidden_row < 0 || hidden_row >= n_hidden) __trap();  // as the ids: never a silent out-of-bounds read
  const float* h = hidden + hidden_row * hidden_size;
  const int64_t* ids = idx + hidden_row * k;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // One warp per id: h . W[id] (+ b[id]).
  for (int j = warp; j < k; j += T / 32) {
    const int64_t id = ids[j];
    if (id < 0 || id >= vocab) __trap();  // never a silent out-of-bounds read (ids come from row_stats)
    const float* w = weight + id * stride_w;
    float dot = 0.f;
    for (int64_t c = lane; c < hidden_size; c += 32) dot = fmaf(h[c], w[c], dot);
    dot = warp_sum(dot);
    if (lane == 0) {
      const float y = dot + (bias != nullptr ? bias[id] : 0.f);
      // the model's logit transform (the cap keeps -inf); its derivative: the cap's in block_divergence,
      // logit_scale in the coefficient
      zs[j] = softcap > 0.f ? (y == -INFINITY ? y : softcap * tanhf(logit_scale * y / softcap)) : logit_scale * y;
    }
  }
  for (int j = threadIdx.x; j < k; j += T) zt[j] = source_logits[hidden_row * k + j];
  __syncthreads();
  const float v = block_divergence<T>(zs, zt, k, scale, 1.f, kind, beta, grad_scale[r] * logit_scale, softcap, -1,
                                      nullptr, red_m, red_s);
  if (threadIdx.x == 0) value[r] = v;
  __syncthreads();  // zs holds the gradient of every id
  if (hidden_grad != nullptr || weight_grad != nullptr) {
    for (int64_t c = threadIdx.x; c < hidden_size; c += T) {
      const float hc = h[c];
      float acc = 0.f;
      for (int j = 0; j < k; ++j) {
        const float g = zs[j];
        const int64_t id = ids[j];
        acc = fmaf(g, weight[id * stride_w + c], acc);
        if (weight_grad != nullptr && g != 0.f) atomicAdd(weight_grad + id * hidden_size + c, g * hc);
      }
      if (hidden_grad != nullptr) atomicAdd(hidden_grad + hidden_row * hidden_size + c, acc);
    }
  }
  if (bias_grad != nullptr) {
    for (int j = threadIdx.x; j < k; j += T) {
      if (zs[j] != 0.f) atomicAdd(bias_grad + ids[j], zs[j]);
    }
  }
}

}  // namespace

int full_divergence(float* student, float* source, int64_t rows, int64_t vocab, int64_t stride_s, int64_t stride_t,
                    const int64_t* targets, Kind kind, float beta, float scale, float softcap,
                    const float* grad_scale, float* value, float* target_logprob, void* stream) {
  if (rows == 0) return 0;
  full_divergence_kernel<<<static_cast<unsigned>(rows), kRowThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      student, source, vocab, stride_s, stride_t, targets, kind, beta, scale, softcap, grad_scale, value,
      target_logprob);
  return static_cast<int>(cudaGetLastError());
}

int topk_divergence(const float* hidden, int64_t n_hidden, int64_t hidden_size, const int64_t* rows, int64_t n_rows,
                    const float* weight, int64_t vocab, int64_t stride_w, const float* bias, const int64_t* idx, int64_t k,
                    const float* source_logits, Kind kind, float beta, float scale, float logit_scale,
                    float softcap, const float* grad_scale, float* value, float* hidden_grad, float* weight_grad,
                    float* bias_grad, void* stream) {
  if (n_rows == 0) return 0;
  topk_divergence_kernel<<<static_cast<unsigned>(n_rows), kTopkThreads, 2 * k * sizeof(float),
                           static_cast<cudaStream_t>(stream)>>>(hidden, n_hidden, hidden_size, rows, weight, vocab, stride_w,
                                                                bias, idx, static_cast<int>(k), source_logits, kind,
                                                                beta, scale, logit_scale, softcap, grad_scale, value,
                                                                hidden_grad, weight_grad, bias_grad);
  return static_cast<int>(cudaGetLastError());
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace dopd::cuda
