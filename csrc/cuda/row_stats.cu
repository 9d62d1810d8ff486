// CUDA kernel of dopd::row_stats (512 threads, one block per row): pass 1 reads the row once for the online
// (max, sum-exp), the target logit and a 2048-bin histogram of the top 11 bits of each entry's order key (the
// float's bits made monotonic); the k-th largest key is then found by radix select (11 + 11 + 10 bits; passes
// 2-3 re-read the row, counting only entries on the current prefix, and stop as soon as the boundary bin is
// taken whole); a last pass collects the entries above the boundary and, on it, the lowest ids first (a block
// scan of the tile's equal entries, only on tiles that hold one); the k selected (key, id) pairs are sorted in
// shared memory (bitonic) and written in descending order. Rows are read 2-4 times: ~2-4x V floats of traffic.
#include <cuda_runtime.h>

#include <cstdint>

#include "block.cuh"
#include "launch.h"

namespace dopd::cuda {
namespace {

using namespace detail;

constexpr int kStatsThreads = 512;
constexpr int kBins = 2048;

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

}  // namespace dopd::cuda
