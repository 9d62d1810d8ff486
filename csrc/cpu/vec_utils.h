// Helpers shared by the CPU kernels: a dynamic parallel loop, and at::vec pieces (NaN-propagating max, an
// accurate running sum, masked tails).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>

namespace dopd::cpu {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// body(begin, end) over [0, n) in ranges of `step`, handed out to the threads of ATen's (OpenMP) pool as they come
// free. at::parallel_for's static halves wait for the slowest thread: on a shared machine a descheduled thread
// would hold up half the rows; here it holds up one range.
template <typename F>
void dynamic_for(int64_t n, int64_t step, const F& body) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t tasks = std::min<int64_t>(at::get_num_threads(), (n + step - 1) / step);
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    for (int64_t b = next.fetch_add(step); b < n; b = next.fetch_add(step)) body(b, std::min(n, b + step));
  });
}

// `count` lanes from `p` (count <= kW), the others `fill`.
inline Vec load_or(const float* p, int64_t count, float fill) {
  return count == kW ? Vec::loadu(p) : Vec::set(Vec(fill), Vec::loadu(p, count), count);
}

// Lanes past `count` set to 0 (so that a masked tail adds nothing to a sum).
inline Vec first(const Vec& x, int64_t count) {
  return count == kW ? x : Vec::set(Vec(0.0f), x, count);
}

// Largest lane; NaN if any lane is NaN.
inline float reduce_max(const Vec& v) {
  alignas(64) float lanes[kW];
  v.store(lanes);
  float m = lanes[0];
  for (int64_t i = 1; i < kW; ++i) {
    if (std::isnan(lanes[i]) || lanes[i] > m) m = lanes[i];
  }
  return m;
}

// Largest of a row (stride 1); NaN if any entry is NaN.
inline float row_max(const float* z, int64_t n) {
  Vec acc(kNegInf);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) acc = at::vec::maximum(acc, Vec::loadu(z + i));
  if (i < n) acc = at::vec::maximum(acc, load_or(z + i, n - i, kNegInf));
  return reduce_max(acc);
}

// A sum of many vectors: 16 lanes in fp32 over blocks of kBlock vectors, the blocks added in double, so that a
// 150k-entry row sums as accurately as a pairwise sum (a plain fp32 lane accumulator would add ~10k terms).
class SumAcc {
 public:
  void add(const Vec& x) {
    part_ = part_ + x;
    if (++count_ == kBlock) flush();
  }
  double total() {
    flush();
    return total_;
  }

 private:
  static constexpr int kBlock = 16;
  void flush() {
    alignas(64) float lanes[kW];
    part_.store(lanes);
    for (int64_t i = 0; i < kW; ++i) total_ += lanes[i];
    part_ = Vec(0.0f);
    count_ = 0;
  }
  Vec part_{0.0f};
  int count_ = 0;
  double total_ = 0.0;
};

// log(sum exp(x - xmax)) over a row, x = scale * z rounded to float and xmax = scale * zmax its max (zmax finite).
// Kept apart from xmax: log_softmax = (x - xmax) - this is then exactly -this at the max, as in torch; and with
// accurate exps (not exp_u20, whose exp(0) is 1 - 3e-7), so that a probability near 1 is 1: the divergences'
// gradients s (d - value) cancel there. (Built with -ffp-contract=off: x * s - xmax must not become an FMA.)
inline float row_logsum(const float* z, int64_t n, float zmax, float scale) {
  const Vec vs(scale), vmax(scale * zmax);
  SumAcc sum;
  int64_t i = 0;
  for (; i + kW <= n; i += kW) sum.add((Vec::loadu(z + i) * vs - vmax).exp());
  if (i < n) sum.add(first((Vec::loadu(z + i, n - i) * vs - vmax).exp(), n - i));
  return static_cast<float>(std::log(sum.total()));
}

}  // namespace dopd::cpu
