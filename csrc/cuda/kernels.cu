// CUDA kernels of the dopd ops: one thread block per row, block-wide reductions from warp shuffles.
//
// row_stats (512 threads): pass 1 reads the row once for the online (max, sum-exp), the target logit and a
// 2048-bin histogram of the top 11 bits of each entry's order key (the float's bits made monotonic); the
// k-th largest key is then found by radix select (11 + 11 + 10 bits; passes 2-3 re-read the row, counting
// only entries on the current prefix, and stop as soon as the boundary bin is taken whole); a last pass
// collects the entries above the boundary and, on it, the lowest ids first (a block scan of the tile's
// equal entries, only on tiles that hold one); the k selected (key, id) pairs are sorted in shared memory
// (bitonic) and written in descending order. Rows are read 2-4 times: the memory-bound cost is ~2-4x V floats.
// full_divergence (512 threads) and topk_divergence (256 threads): the closed forms of ../cpu/divergence.cpp;
// topk_divergence adds into d hidden and d W with atomics (one per (row, id, hidden column) for d W).
#include <cuda_runtime.h>

#include <cstdint>

#include "launch.h"

namespace dopd::cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kStatsThreads = 512;
constexpr int kRowThreads = 512;
constexpr int kTopkThreads = 256;
constexpr int kBins = 2048;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// Sum over the block; every thread gets it. `red`: T / 32 floats of shared memory.
template <int T>
__device__ float block_sum(float v, float* red) {
  v = warp_sum(v);
  __syncthreads();  // earlier readers of `red` are done
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < T / 32; ++w) total += red[w];
  return total;
}

// Exclusive prefix sum over the block in thread order; *total gets the block's sum. `red`: T / 32 ints.
template <int T>
__device__ int block_exclusive_sum(int v, int* red, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int n = __shfl_up_sync(kFull, incl, o);
    if (lane >= o) incl += n;
  }
  __syncthreads();
  if (lane == 31) red[warp] = incl;
  __syncthreads();
  int before = 0, sum = 0;
#pragma unroll
  for (int w = 0; w < T / 32; ++w) {
    before += w < warp ? red[w] : 0;
    sum += red[w];
  }
  *total = sum;
  return before + incl - v;
}

// A running log-sum-exp: max m and sum of exp(x - m). -inf entries add nothing; NaN is tracked by the caller.
struct MaxSum {
  float m, s;
};

// exp: the fast approximation for the statistics' sums, the accurate one where a probability near 1 must be 1
// (the divergences' gradients s (d - value) cancel there).
template <bool Accurate>
__device__ __forceinline__ float exp_of(float x) {
  return Accurate ? expf(x) : __expf(x);
}

template <bool Accurate>
__device__ __forceinline__ void online_add(MaxSum& p, float y) {
  if (!(y > -INFINITY)) return;
  if (y > p.m) {
    p.s = (isinf(p.m) ? 0.f : p.s * exp_of<Accurate>(p.m - y)) + 1.f;
    p.m = y;
  } else if (!isinf(p.m)) {
    p.s += exp_of<Accurate>(y - p.m);
  }
}

template <bool Accurate>
__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (isinf(m)) return {m, 1.f};  // all -inf, or a +inf: the sum no longer matters
  return {m, a.s * exp_of<Accurate>(a.m - m) + b.s * exp_of<Accurate>(b.m - m)};
}

template <int T, bool Accurate>
__device__ MaxSum block_merge(MaxSum p, float* red_m, float* red_s) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    p = merge<Accurate>(p, MaxSum{__shfl_xor_sync(kFull, p.m, o), __shfl_xor_sync(kFull, p.s, o)});
  }
  __syncthreads();
  if ((threadIdx.x & 31) == 0) {
    red_m[threadIdx.x >> 5] = p.m;
    red_s[threadIdx.x >> 5] = p.s;
  }
  __syncthreads();
  MaxSum total{-INFINITY, 0.f};
#pragma unroll
  for (int w = 0; w < T / 32; ++w) total = merge<Accurate>(total, MaxSum{red_m[w], red_s[w]});
  return total;
}

__device__ __forceinline__ float lse_of(MaxSum p, bool nan) {
  return nan ? NAN : (isinf(p.m) ? p.m : p.m + logf(p.s));
}

// The float's order as an unsigned key (larger float, larger key); -0 keys as +0; NaN is the smallest key.
__device__ __forceinline__ uint32_t order_key(float x) {
  if (isnan(x)) return 0u;
  const uint32_t b = __float_as_uint(x == 0.f ? 0.f : x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Key and id in one integer: larger key first, then lower id.
__device__ __forceinline__ uint64_t pack(uint32_t key, int64_t id) {
  return (static_cast<uint64_t>(key) << 32) | static_cast<uint64_t>(0xFFFFFFFFu - static_cast<uint32_t>(id));
}

__global__ void __launch_bounds__(kStatsThreads)
    row_stats_kernel(const float* __restrict__ z, int64_t vocab, int64_t stride, const int64_t* __restrict__ targets,
                     int k, float scale, float* __restrict__ lse, float* __restrict__ target_logit,
                     float* __restrict__ topk_vals, int64_t* __restrict__ topk_idx, int n_pow2) {
  constexpr int T = kStatsThreads;
  extern __shared__ uint64_t selected[];  // n_pow2 slots
  __shared__ uint32_t hist[kBins];
  __shared__ float red_m[T / 32], red_s[T / 32];
  __shared__ int red_i[T / 32];
  __shared__ uint32_t s_bin;
  __shared__ int s_need, s_bin_count, s_count, s_equal_base;
  const int tid = threadIdx.x;
  const int64_t row = blockIdx.x;
  const float* x = z + row * stride;

  if (k > 0) {
    for (int i = tid; i < kBins; i += T) hist[i] = 0u;
  }
  __syncthreads();
  // Pass 1: log-sum-exp and the histogram of the top 11 key bits.
  MaxSum p{-INFINITY, 0.f};
  bool nan = false;
  for (int64_t i = tid; i < vocab; i += T) {
    const float v = x[i];
    if (k > 0) atomicAdd(&hist[order_key(v) >> 21], 1u);
    const float y = __fmul_rn(v, scale);  // never contracted into an FMA: x - xmax is exactly 0 at the max
    nan |= isnan(y);
    online_add<false>(p, y);
  }
  nan = __syncthreads_or(nan);
  p = block_merge<T, false>(p, red_m, red_s);  // ends after a barrier: the histogram is complete
  if (tid == 0) {
    lse[row] = lse_of(p, nan);
    const int64_t y = targets[row];
    target_logit[row] = (y >= 0 && y < vocab) ? scale * x[y] : NAN;
  }
  if (k == 0) return;

  // Radix select: after each digit, `prefix` holds the k-th largest key's bits above `shift`, and `need` the
  // number of entries on that prefix still to take (all entries above the prefix are taken).
  uint32_t prefix = 0u;
  int need = k, shift = 21;
  bool take_all = false;
  for (int level = 0; level < 3; ++level) {
    shift = level == 0 ? 21 : (level == 1 ? 10 : 0);
    const int bits = level == 2 ? 10 : 11;
    const int bins = 1 << bits;
    if (level > 0) {
      for (int i = tid; i < kBins; i += T) hist[i] = 0u;
      __syncthreads();
      for (int64_t i = tid; i < vocab; i += T) {
        const uint32_t key = order_key(x[i]);
        if ((key >> (shift + bits)) == prefix) atomicAdd(&hist[(key >> shift) & (bins - 1)], 1u);
      }
      __syncthreads();
    }
    // Thread t owns bins [bins - (t + 1) per, bins - t per): thread order is descending key order.
    const int per = bins / T;
    const int top = bins - tid * per;
    int local = 0;
    for (int b = top - 1; b >= top - per; --b) local += static_cast<int>(hist[b]);
    int total;
    const int above = block_exclusive_sum<T>(local, red_i, &total);
    if (above < need && above + local >= need) {  // exactly one thread holds the crossing
      int cum = above;
      for (int b = top - 1; b >= top - per; --b) {
        if (cum + static_cast<int>(hist[b]) >= need) {
          s_bin = static_cast<uint32_t>(b);
          s_need = need - cum;
          s_bin_count = static_cast<int>(hist[b]);
          break;
        }
        cum += static_cast<int>(hist[b]);
      }
    }
    __syncthreads();
    prefix = (prefix << bits) | s_bin;
    need = s_need;
    take_all = s_bin_count == need;
    __syncthreads();  // s_* and hist are read before the next level writes them
    if (take_all) break;
  }

  // Selection: entries above the prefix, and on it all of them (take_all) or the `need` lowest ids.
  if (tid == 0) {
    s_count = 0;
    s_equal_base = 0;
  }
  __syncthreads();
  for (int64_t base = 0; base < vocab; base += T) {
    const int64_t i = base + tid;
    const bool valid = i < vocab;
    const uint32_t key = valid ? order_key(x[i]) : 0u;
    const uint32_t p_key = key >> shift;
    const bool above = valid && p_key > prefix;
    const bool equal = valid && p_key == prefix;
    if (above || (take_all && equal)) selected[atomicAdd(&s_count, 1)] = pack(key, i);
    if (!take_all && __syncthreads_or(equal)) {
      int tile_equal;
      const int rank = block_exclusive_sum<T>(equal ? 1 : 0, red_i, &tile_equal);
      if (equal && s_equal_base + rank < need) selected[atomicAdd(&s_count, 1)] = pack(key, i);
      __syncthreads();
      if (tid == 0) s_equal_base += tile_equal;
      __syncthreads();
    }
  }
  __syncthreads();
  // Bitonic sort of the k selected keys, descending (padding keys 0 sink to the end).
  for (int i = k + tid; i < n_pow2; i += T) selected[i] = 0u;
  __syncthreads();
  for (int size = 2; size <= n_pow2; size <<= 1) {
    for (int half = size >> 1; half > 0; half >>= 1) {
      for (int i = tid; i < n_pow2; i += T) {
        const int j = i ^ half;
        if (j > i) {
          const uint64_t a = selected[i], b = selected[j];
          const bool descending = (i & size) == 0;
          if (descending ? a < b : a > b) {
            selected[i] = b;
            selected[j] = a;
          }
        }
      }
      __syncthreads();
    }
  }
  for (int j = tid; j < k; j += T) {
    const int64_t id = 0xFFFFFFFFu - static_cast<uint32_t>(selected[j] & 0xFFFFFFFFu);
    topk_idx[row * k + j] = id;
    topk_vals[row * k + j] = scale * x[id];
  }
}

// The divergence of one row pair over n entries (global or shared memory), by the whole block: as
// cpu::row_divergence. zs <- coef * dD/dzs (scale_s included), zt scratch; thread 0 writes *target_logprob.
// The soft-cap's derivative 1 - (t / cap)^2 at a capped logit t (1 without a cap, 0 at -inf).
__device__ __forceinline__ float cap_factor(float t, float softcap) {
  if (softcap <= 0.f) return 1.f;
  if (t == -INFINITY) return 0.f;
  const float u = t / softcap;
  return 1.f - u * u;
}

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
    topk_divergence_kernel(const float* __restrict__ hidden, int64_t hidden_size, const int64_t* __restrict__ rows,
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
  const float* h = hidden + hidden_row * hidden_size;
  const int64_t* ids = idx + r * k;
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
  for (int j = threadIdx.x; j < k; j += T) zt[j] = source_logits[r * k + j];
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

int row_stats(const float* z, int64_t rows, int64_t vocab, int64_t stride, const int64_t* targets, int64_t k,
              float scale, float* lse, float* target_logit, float* topk_vals, int64_t* topk_idx, void* stream) {
  if (rows == 0) return 0;
  int n_pow2 = 1;
  while (n_pow2 < k) n_pow2 <<= 1;
  row_stats_kernel<<<static_cast<unsigned>(rows), kStatsThreads, n_pow2 * sizeof(uint64_t),
                     static_cast<cudaStream_t>(stream)>>>(z, vocab, stride, targets, static_cast<int>(k), scale, lse,
                                                           target_logit, topk_vals, topk_idx, n_pow2);
  return static_cast<int>(cudaGetLastError());
}

int full_divergence(float* student, float* source, int64_t rows, int64_t vocab, int64_t stride_s, int64_t stride_t,
                    const int64_t* targets, Kind kind, float beta, float scale, float softcap,
                    const float* grad_scale, float* value, float* target_logprob, void* stream) {
  if (rows == 0) return 0;
  full_divergence_kernel<<<static_cast<unsigned>(rows), kRowThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      student, source, vocab, stride_s, stride_t, targets, kind, beta, scale, softcap, grad_scale, value,
      target_logprob);
  return static_cast<int>(cudaGetLastError());
}

int topk_divergence(const float* hidden, int64_t hidden_size, const int64_t* rows, int64_t n_rows, const float* weight,
                    int64_t vocab, int64_t stride_w, const float* bias, const int64_t* idx, int64_t k,
                    const float* source_logits, Kind kind, float beta, float scale, float logit_scale,
                    float softcap, const float* grad_scale, float* value, float* hidden_grad, float* weight_grad,
                    float* bias_grad, void* stream) {
  if (n_rows == 0) return 0;
  topk_divergence_kernel<<<static_cast<unsigned>(n_rows), kTopkThreads, 2 * k * sizeof(float),
                           static_cast<cudaStream_t>(stream)>>>(hidden, hidden_size, rows, weight, vocab, stride_w,
                                                                bias, idx, static_cast<int>(k), source_logits, kind,
                                                                beta, scale, logit_scale, softcap, grad_scale, value,
                                                                hidden_grad, weight_grad, bias_grad);
  return static_cast<int>(cudaGetLastError());
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace dopd::cuda
