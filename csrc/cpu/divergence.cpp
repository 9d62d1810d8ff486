// CPU kernels of dopd::full_divergence_ and dopd::topk_divergence: the divergence of one row pair and its
// gradient with respect to the student's logits, in three sweeps over rows that stay in L2:
//   (1) both maxima, then both log-sum-exps;
//   (2) the sums of the value (the student's probabilities s and a per-entry difference stored in place);
//   (3) the gradient from what (2) stored (no transcendental), or already in (2) for fkl.
// Closed forms (divergences.py): with ls, lt the log-softmaxes and dD/dz = s * (g - <s, g>),
//   rkl: value = sum s (ls - lt),                  grad = s (ls - lt - value)
//   fkl: value = sum t (lt - ls),                  grad = s - t
//   jsd: lm = log(beta t + (1 - beta) s),  value = beta sum t (lt - lm) + (1 - beta) sum s (ls - lm),
//        grad = (1 - beta) s (ls - lm - sum s (ls - lm)).
// Terms with a zero probability factor are 0 (0 log 0 = 0), so -inf logits never give NaN.
#include "kernels.h"
#include "vec_utils.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace dopd::cpu {
namespace {

const Vec kZero(0.0f);

// 0 where `p` is 0, else x (p * x with the 0 * inf = 0 convention of the divergences).
inline Vec unless_zero(const Vec& p, const Vec& x) { return Vec::blendv(x, kZero, p == kZero); }

// The divergence of one row pair. zs / zt: n raw logits of the student / source (log-softmax of scale_s * zs
// and scale_t * zt). Writes coef * dD/dzs into zs (chain factor scale_s included; with softcap > 0, also the
// soft-cap's 1 - (zs / softcap)^2); zt is scratch. When 0 <= target < n, *target_logprob = ls[target].
float row_divergence(float* zs, float* zt, int64_t n, float scale_s, float scale_t, Kind kind, float beta,
                     float coef, float softcap, int64_t target, float* target_logprob) {
  // log_softmax(x) = (x - xmax) - logsum with x = scale * z rounded, as torch computes it (exact at the max)
  const float max_s = row_max(zs, n), max_t = row_max(zt, n);
  const float xmax_s = scale_s * max_s, xmax_t = scale_t * max_t;
  const float sum_s = std::isfinite(max_s) ? row_logsum(zs, n, max_s, scale_s) : 0.0f;  // else NaN/inf rows stay so
  const float sum_t = std::isfinite(max_t) ? row_logsum(zt, n, max_t, scale_t) : 0.0f;
  if (target_logprob != nullptr) {
    *target_logprob = (target >= 0 && target < n) ? (scale_s * zs[target] - xmax_s) - sum_s : kNaN;
  }
  const Vec as(scale_s), ms(xmax_s), bs(sum_s), at_(scale_t), mt(xmax_t), bt(sum_t);
  const Vec vbeta(beta), vbeta1(1.0f - beta), one(1.0f), inv_cap(softcap > 0.0f ? 1.0f / softcap : 0.0f);
  // the soft-cap's derivative 1 - (t / cap)^2 at the student's logits t: 1 without a cap, 0 at -inf (the
  // transform keeps -inf, and its derivative there is 0)
  const Vec neg_inf(kNegInf);
  auto cap_factor = [&](const Vec& t) {
    return softcap > 0.0f ? Vec::blendv(one - (t * inv_cap) * (t * inv_cap), kZero, t == neg_inf) : one;
  };
  SumAcc acc_s, acc_t;
  // Sweep 2 on `count` lanes at offset i (count < kW only for the tail; lanes past it add 0, store nothing).
  // s is stored times the cap factor: sweep 3 needs only the product.
  auto sweep2 = [&](int64_t i, int64_t count) {
    const Vec zi = Vec::loadu(zs + i, count);
    const Vec ls = (zi * as - ms) - bs;
    const Vec lt = (Vec::loadu(zt + i, count) * at_ - mt) - bt;
    const Vec s = ls.exp();  // accurate exps here: s near 1 must be 1 (the gradient is s (d - value))
    if (kind == Kind::rkl) {
      const Vec d = unless_zero(s, ls - lt);
      acc_s.add(first(s * d, count));
      (s * cap_factor(zi)).store(zs + i, count);
      d.store(zt + i, count);
    } else if (kind == Kind::fkl) {
      const Vec t = lt.exp();
      acc_t.add(first(unless_zero(t, t * (lt - ls)), count));
      ((s - t) * cap_factor(zi) * Vec(coef * scale_s)).store(zs + i, count);
    } else {
      const Vec t = lt.exp();
      const Vec lm = at::vec::fmadd(t, vbeta, s * vbeta1).log();
      const Vec d = unless_zero(s, ls - lm);
      acc_t.add(first(unless_zero(t, t * (lt - lm)), count));
      acc_s.add(first(s * d, count));
      (s * cap_factor(zi)).store(zs + i, count);
      d.store(zt + i, count);
    }
  };
  int64_t i = 0;
  for (; i + kW <= n; i += kW) sweep2(i, kW);
  if (i < n) sweep2(i, n - i);
  if (kind == Kind::fkl) return static_cast<float>(acc_t.total());
  const float kl_s = static_cast<float>(acc_s.total());
  const float value = kind == Kind::rkl ? kl_s : static_cast<float>(beta * acc_t.total() + (1.0 - beta) * kl_s);
  // Sweep 3: grad = c * s * (d - center), with (c, center) = (coef scale_s, value) for rkl and
  // (coef scale_s (1 - beta), sum s (ls - lm)) for jsd.
  const Vec c(coef * scale_s * (kind == Kind::rkl ? 1.0f : 1.0f - beta));
  const Vec center(kl_s);
  auto sweep3 = [&](int64_t j, int64_t count) {
    const Vec s = Vec::loadu(zs + j, count);
    const Vec d = Vec::loadu(zt + j, count);
    (s * (d - center) * c).store(zs + j, count);
  };
  i = 0;
  for (; i + kW <= n; i += kW) sweep3(i, kW);
  if (i < n) sweep3(i, n - i);
  return value;
}

// Ask for a row of `n` floats ahead of its use: the top-K ids hit random rows of W (2 KB each at H = 512),
// and the hardware prefetcher only starts within a row, so the loads of one row would otherwise wait on DRAM.
inline void prefetch_row(const float* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 64 / sizeof(float)) __builtin_prefetch(p + i);
}

inline float dot(const float* a, const float* b, int64_t n) {
  Vec acc0(0.0f), acc1(0.0f);
  int64_t i = 0;
  for (; i + 2 * kW <= n; i += 2 * kW) {
    acc0 = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc0);
    acc1 = at::vec::fmadd(Vec::loadu(a + i + kW), Vec::loadu(b + i + kW), acc1);
  }
  for (; i < n; i += kW) {
    const int64_t count = std::min<int64_t>(kW, n - i);
    acc0 = at::vec::fmadd(Vec::loadu(a + i, count), Vec::loadu(b + i, count), acc0);  // zero-filled lanes
  }
  alignas(64) float lanes[kW];
  (acc0 + acc1).store(lanes);
  float total = 0.0f;
  for (int64_t l = 0; l < kW; ++l) total += lanes[l];
  return total;
}

// y += alpha * x over n entries.
inline void axpy(float alpha, const float* x, float* y, int64_t n) {
  const Vec a(alpha);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) at::vec::fmadd(a, Vec::loadu(x + i), Vec::loadu(y + i)).store(y + i);
  if (i < n) at::vec::fmadd(a, Vec::loadu(x + i, n - i), Vec::loadu(y + i, n - i)).store(y + i, n - i);
}

}  // namespace

void full_divergence(float* student, float* source, int64_t rows, int64_t vocab, int64_t stride_s,
                     int64_t stride_t, const int64_t* targets, Kind kind, float beta, float scale, float softcap,
                     const float* grad_scale, float* value, float* target_logprob) {
  dynamic_for(rows, 2, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      value[r] = row_divergence(student + r * stride_s, source + r * stride_t, vocab, scale, scale, kind, beta,
                                grad_scale[r], softcap, targets[r], target_logprob + r);
    }
  });
}

void topk_divergence(const float* hidden, int64_t hidden_size, const int64_t* rows, int64_t n_rows,
                     const float* weight, int64_t vocab, int64_t stride_w, const float* bias, const int64_t* idx,
                     int64_t k, const float* source_logits, Kind kind, float beta, float scale, float logit_scale,
                     float softcap, const float* grad_scale, float* value, float* hidden_grad, float* weight_grad,
                     float* bias_grad) {
  const bool fold_weight = weight_grad != nullptr || bias_grad != nullptr;
  // coef * dD/dz per (row, j), kept for the weight fold below.
  std::vector<float> grad_z(fold_weight ? n_rows * k : 0);
  // Rows: the K logits (K rows of W, then in L2 for the d hidden sum), the divergence and its gradient.
  dynamic_for(n_rows, std::max<int64_t>(1, 2048 / std::max<int64_t>(k, 1)), [&](int64_t begin, int64_t end) {
    std::vector<float> zs(k), zt(k);
    for (int64_t r = begin; r < end; ++r) {
      const float* h = hidden + rows[r] * hidden_size;
      const int64_t* ids = idx + rows[r] * k;
      constexpr int64_t kAhead = 4;  // rows of W in flight
      for (int64_t j = 0; j < std::min(kAhead, k); ++j) prefetch_row(weight + ids[j] * stride_w, hidden_size);
      for (int64_t j = 0; j < k; ++j) {
        if (j + kAhead < k) prefetch_row(weight + ids[j + kAhead] * stride_w, hidden_size);
        const float y = dot(h, weight + ids[j] * stride_w, hidden_size) + (bias != nullptr ? bias[ids[j]] : 0.0f);
        // the logit transform (softcap * tanh(logit_scale * y / softcap) keeps -inf) ...
        zs[j] = softcap > 0.0f ? (y == kNegInf ? y : softcap * std::tanh(logit_scale * y / softcap)) : logit_scale * y;
      }
      std::copy(source_logits + rows[r] * k, source_logits + (rows[r] + 1) * k, zt.begin());
      // ... and its derivative: the cap's inside row_divergence, logit_scale in the coefficient
      value[r] = row_divergence(zs.data(), zt.data(), k, scale, 1.0f, kind, beta, grad_scale[r] * logit_scale,
                                softcap, -1, nullptr);
      if (fold_weight) std::copy(zs.begin(), zs.end(), grad_z.begin() + r * k);
      if (hidden_grad == nullptr) continue;
      float* dh = hidden_grad + rows[r] * hidden_size;  // rows are distinct: no other thread writes it
      for (int64_t j = 0; j < k; ++j) {
        if (zs[j] != 0.0f) axpy(zs[j], weight + ids[j] * stride_w, dh, hidden_size);
      }
    }
  });
  if (!fold_weight) return;
  // d W[v] += sum over the (row, j) with idx = v of grad_z * hidden[row]: bucket the pairs by id (counting
  // sort, in row order), then each id is summed by one thread and its row of d W is written once.
  // pair e = (r, j) of this call: its id
  auto pair_id = [&](int64_t e) { return idx[rows[e / k] * k + e % k]; };
  std::vector<int64_t> start(vocab + 1, 0);
  for (int64_t e = 0; e < n_rows * k; ++e) ++start[pair_id(e) + 1];
  for (int64_t v = 0; v < vocab; ++v) start[v + 1] += start[v];
  std::vector<int64_t> order(n_rows * k);
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t e = 0; e < n_rows * k; ++e) order[fill[pair_id(e)]++] = e;
  }
  // Blocks of ids with about equal numbers of pairs (frequent ids would unbalance equal id ranges).
  const int64_t n_blocks = std::min<int64_t>(vocab, 8 * at::get_num_threads());
  std::vector<int64_t> block_start(n_blocks + 1, vocab);
  block_start[0] = 0;
  for (int64_t b = 1, v = 0; b < n_blocks; ++b) {
    const int64_t goal = n_rows * k * b / n_blocks;
    while (v < vocab && start[v] < goal) ++v;
    block_start[b] = std::max(v, block_start[b - 1]);
  }
  const int64_t n_pairs = n_rows * k;
  dynamic_for(n_blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> acc(hidden_size);  // the sum for one id, in L1; its row of d W is then read and written once
    for (int64_t v = block_start[b0]; v < block_start[b1]; ++v) {
      if (start[v] == start[v + 1]) continue;
      std::fill(acc.begin(), acc.end(), 0.0f);
      float bias_sum = 0.0f;
      for (int64_t p = start[v]; p < start[v + 1]; ++p) {
        const int64_t e = order[p];
        if (p + 2 < n_pairs) prefetch_row(hidden + rows[order[p + 2] / k] * hidden_size, hidden_size);
        axpy(grad_z[e], hidden + rows[e / k] * hidden_size, acc.data(), hidden_size);
        bias_sum += grad_z[e];
      }
      if (weight_grad != nullptr) axpy(1.0f, acc.data(), weight_grad + v * hidden_size, hidden_size);
      if (bias_grad != nullptr) bias_grad[v] += bias_sum;
    }
  });
}

}  // namespace dopd::cpu
