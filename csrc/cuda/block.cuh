// Block-wide building blocks of the CUDA kernels (row_stats.cu, divergence.cu): warp-shuffle reductions, a block
// scan, and a running log-sum-exp. Device code only; included by each .cu (no relocatable device code needed).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dopd::cuda::detail {


constexpr unsigned kFull = 0xffffffffu;

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

}  // namespace dopd::cuda::detail
