// CPU kernel of dopd::row_stats: per row the log-sum-exp, the target logit and the exact top-K, in two sweeps
// over the row (the second one reads it from L2): (1) the max and a bound of the K-th largest value, (2) the
// sum of exps and the top-K candidates.
//
// Top-K: the maxima of ~4K disjoint sets of entries (the lanes of blockwise vector maxima) give a lower bound
// of the K-th largest value (the K-th largest set maximum: K distinct entries reach it), so sweep 2 admits only
// entries >= that bound into a candidate list: ~1.5K of them on random rows, one vector compare for the rest. A list that fills up (2K entries: rows with many equal values) is cut to
// its K best (nth_element) and the bound becomes strict: the row is scanned in increasing id order, so a
// later entry equal to the K-th kept value has a larger id and loses the tie. Exact, with ties to the lower id.
#include "kernels.h"
#include "vec_utils.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

namespace dopd::cpu {
namespace {

// A candidate as one integer: larger value first, then lower id (the project's order). -0.0 is stored as +0.0 so
// that the two tie (by id) as they compare equal; NaN never enters the list.
inline uint64_t make_key(float val, int64_t id) {
  uint32_t bits;
  const float canonical = val + 0.0f;
  std::memcpy(&bits, &canonical, sizeof(bits));
  bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<uint64_t>(bits) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(id));
}
inline int64_t key_id(uint64_t key) { return 0xFFFFFFFFu - static_cast<uint32_t>(key & 0xFFFFFFFFu); }

class CandidateList {
 public:
  explicit CandidateList(int64_t k) : k_(k), cap_(std::max<int64_t>(2 * k, k + 64)), buf_(cap_) {}

  // Admit entries >= `bound` (and > -inf) until the first cut.
  void reset(float bound) {
    n_ = 0;
    low_ = std::max(bound, -std::numeric_limits<float>::max());
  }
  // Entries x >= low() enter the list (after a cut, low() is the next float above the K-th kept value).
  float low() const { return low_; }

  void push(const float* z, int64_t id) {
    buf_[n_++] = make_key(z[id], id);
    if (n_ == cap_) cut(z);
  }

  // The K best in order, into vals (scaled) / ids; a row with fewer than K entries above -inf (then the bound
  // was -inf and every such entry was admitted) is completed with its -inf or NaN entries in id order.
  void write(const float* z, int64_t vocab, float scale, float* vals, int64_t* ids) {
    if (n_ > k_) cut(z);
    std::sort(buf_.begin(), buf_.begin() + n_, std::greater<uint64_t>());
    for (int64_t j = 0; j < n_; ++j) {
      ids[j] = key_id(buf_[j]);
      vals[j] = scale * z[ids[j]];
    }
    int64_t j = n_;
    for (int64_t v = 0; j < k_ && v < vocab; ++v) {
      if (!(z[v] > kNegInf)) {
        vals[j] = scale * z[v];
        ids[j++] = v;
      }
    }
  }

 private:
  void cut(const float* z) {
    std::nth_element(buf_.begin(), buf_.begin() + (k_ - 1), buf_.begin() + n_, std::greater<uint64_t>());
    n_ = k_;
    low_ = std::nextafter(z[key_id(buf_[k_ - 1])], std::numeric_limits<float>::infinity());
  }

  int64_t k_, cap_, n_ = 0;
  float low_ = kNegInf;
  std::vector<uint64_t> buf_;
};

// Sweep 1: the row's max (NaN-propagating) and a lower bound of its k-th largest entry: the row is cut into
// blocks of whole vectors, each lane of a block's running max is the max of a disjoint set of entries, and the
// k-th largest of these ~4k set maxima is reached by k distinct entries. -inf when there are fewer than k sets
// or a NaN (the -inf fill of a partial last vector can only lower the bound).
std::pair<float, float> block_bound(const float* z, int64_t vocab, int64_t k, std::vector<float>* maxima) {
  const int64_t n_vec = (vocab + kW - 1) / kW;
  const int64_t per_block = std::max<int64_t>(1, n_vec * kW / (4 * std::max<int64_t>(k, 1)));
  const int64_t n_sets = (n_vec + per_block - 1) / per_block * kW;
  if (k == 0 || n_sets < k) return {row_max(z, vocab), kNegInf};
  maxima->resize(n_sets);
  Vec all(kNegInf);
  for (int64_t v0 = 0, set = 0; v0 < n_vec; v0 += per_block, set += kW) {
    Vec acc(kNegInf);
    for (int64_t v = v0; v < std::min(n_vec, v0 + per_block); ++v) {
      acc = at::vec::maximum(acc, load_or(z + v * kW, std::min(kW, vocab - v * kW), kNegInf));
    }
    acc.store(maxima->data() + set);
    all = at::vec::maximum(all, acc);
  }
  const float zmax = reduce_max(all);
  if (std::isnan(zmax)) return {zmax, kNegInf};
  std::nth_element(maxima->begin(), maxima->begin() + (k - 1), maxima->end(), std::greater<float>());
  return {zmax, (*maxima)[k - 1]};
}

// Sweep 2: sum exp(scale (z - zmax)) (when zmax is finite) and the candidates >= list->low() (when k > 0).
double scan_row(const float* z, int64_t vocab, float zmax, float scale, CandidateList* list) {
  const bool sum_exp = std::isfinite(zmax);
  const Vec vs(scale), vmax(scale * zmax);
  Vec vlow(list != nullptr ? list->low() : 0.0f);
  const int full_mask = (1 << kW) - 1;
  SumAcc sum;
  auto step = [&](int64_t i, int64_t count) {
    const Vec x = load_or(z + i, count, kNegInf);
    if (sum_exp) sum.add((x * vs - vmax).exp_u20());  // the -inf fill adds exp(-inf) = 0
    if (list == nullptr) return;
    // zero_mask marks the lanes where the compare is false (0.0); the others are candidates.
    int take = ~(x >= vlow).zero_mask() & full_mask;
    if (take == 0) return;
    do {
      const int lane = __builtin_ctz(take);
      take &= take - 1;
      if (z[i + lane] >= list->low()) list->push(z, i + lane);
    } while (take);
    vlow = Vec(list->low());
  };
  int64_t i = 0;
  for (; i + kW <= vocab; i += kW) step(i, kW);
  if (i < vocab) step(i, vocab - i);
  return sum.total();
}

}  // namespace

void row_stats(const float* z, int64_t rows, int64_t vocab, int64_t stride, const int64_t* targets, int64_t k,
               float scale, float* lse, float* target_logit, float* topk_vals, int64_t* topk_idx) {
  dynamic_for(rows, 4, [&](int64_t begin, int64_t end) {
    CandidateList list(std::max<int64_t>(k, 1));
    std::vector<float> maxima;
    for (int64_t r = begin; r < end; ++r) {
      const float* row = z + r * stride;
      const auto [zmax, bound] = block_bound(row, vocab, k, &maxima);
      list.reset(bound);
      const double sum = scan_row(row, vocab, zmax, scale, k > 0 ? &list : nullptr);
      // all -inf: -inf; any +inf: +inf; any NaN: NaN
      lse[r] = std::isfinite(zmax) ? static_cast<float>(static_cast<double>(scale) * zmax + std::log(sum)) : zmax;
      const int64_t y = targets[r];
      target_logit[r] = (y >= 0 && y < vocab) ? scale * row[y] : kNaN;
      if (k > 0) list.write(row, vocab, scale, topk_vals + r * k, topk_idx + r * k);
    }
  });
}

}  // namespace dopd::cpu
