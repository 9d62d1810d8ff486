// Argument checks and output allocation shared by the CPU and CUDA registrations of the dopd ops (the same
// contract on every device; the schemas are in ops.cpp). Metadata only: no device data is read here.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <string>

#include "kinds.h"

namespace dopd {

inline Kind parse_kind(const std::string& kind) {
  if (kind == "rkl") return Kind::rkl;
  if (kind == "fkl") return Kind::fkl;
  if (kind == "jsd") return Kind::jsd;
  TORCH_CHECK(false, "dopd: kind must be 'rkl', 'fkl' or 'jsd', got '", kind, "'");
}

// A (rows, cols) float32 matrix whose rows are contiguous (any row stride: a view of a wider buffer is fine).
inline void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, "dopd: ", name, " must be 2-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.scalar_type() == at::kFloat, "dopd: ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "dopd: ", name, " must have unit stride along its last dim");
  TORCH_CHECK(t.size(1) < std::numeric_limits<int32_t>::max(), "dopd: ", name, " has too many columns");
}

inline void check_vector(const at::Tensor& t, const char* name, int64_t n, at::ScalarType dtype,
                         const at::Tensor& like) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "dopd: ", name, " must have shape (", n, "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "dopd: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "dopd: ", name, " is on ", t.device(), ", expected ", like.device());
}

inline void check_scale(double scale) {
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "dopd: scale must be finite and > 0, got ", scale);
}

inline void check_beta(Kind kind, double beta) {
  TORCH_CHECK(kind != Kind::jsd || (beta > 0 && beta < 1), "dopd: jsd needs beta in (0, 1), got ", beta);
}

struct RowStatsOut {
  at::Tensor lse, target_logit, topk_vals, topk_idx;
};

inline RowStatsOut row_stats_outputs(const at::Tensor& logits, const at::Tensor& targets, int64_t k,
                                     double scale) {
  check_rows(logits, "logits");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  check_vector(targets, "targets", rows, at::kLong, logits);
  TORCH_CHECK(vocab >= 1, "dopd: logits need at least one column");
  TORCH_CHECK(k >= 0 && k <= vocab, "dopd: k must be in [0, ", vocab, "], got ", k);
  check_scale(scale);
  const auto f32 = logits.options();
  return {at::empty({rows}, f32), at::empty({rows}, f32), at::empty({rows, k}, f32),
          at::empty({rows, k}, f32.dtype(at::kLong))};
}

inline void check_softcap(double softcap) {
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, "dopd: softcap must be finite and >= 0 (0: none), got ",
              softcap);
}

inline void check_full_divergence(const at::Tensor& student, const at::Tensor& source, const at::Tensor& targets,
                                  Kind kind, double beta, double scale, const at::Tensor& grad_scale,
                                  double softcap) {
  check_softcap(softcap);
  check_rows(student, "student");
  check_rows(source, "source");
  TORCH_CHECK(student.sizes() == source.sizes(), "dopd: student and source must have the same shape, got ",
              student.sizes(), " and ", source.sizes());
  TORCH_CHECK(source.device() == student.device(), "dopd: source is on ", source.device(), ", expected ",
              student.device());
  TORCH_CHECK(student.size(1) >= 1, "dopd: student needs at least one column");
  check_vector(targets, "targets", student.size(0), at::kLong, student);
  check_vector(grad_scale, "grad_scale", student.size(0), at::kFloat, student);
  TORCH_CHECK(grad_scale.stride(0) == 1 || student.size(0) <= 1, "dopd: grad_scale must be contiguous");
  TORCH_CHECK(targets.stride(0) == 1 || student.size(0) <= 1, "dopd: targets must be contiguous");
  check_beta(kind, beta);
  check_scale(scale);
}

inline void check_topk_divergence(const at::Tensor& hidden, const at::Tensor& rows, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias, const at::Tensor& idx,
                                  const at::Tensor& source_logits, Kind kind, double beta, double scale,
                                  const at::Tensor& grad_scale, const c10::optional<at::Tensor>& hidden_grad,
                                  const c10::optional<at::Tensor>& weight_grad,
                                  const c10::optional<at::Tensor>& bias_grad, double logit_scale, double softcap) {
  check_softcap(softcap);
  TORCH_CHECK(std::isfinite(logit_scale) && logit_scale > 0, "dopd: logit_scale must be finite and > 0, got ",
              logit_scale);
  check_rows(hidden, "hidden");
  check_rows(weight, "weight");
  TORCH_CHECK(hidden.is_contiguous(), "dopd: hidden must be contiguous");
  TORCH_CHECK(hidden.size(1) == weight.size(1), "dopd: hidden has ", hidden.size(1), " columns, weight has ",
              weight.size(1));
  TORCH_CHECK(weight.device() == hidden.device(), "dopd: weight is on ", weight.device(), ", expected ",
              hidden.device());
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong && rows.is_contiguous() &&
                  rows.device() == hidden.device(),
              "dopd: rows must be a contiguous 1-D int64 tensor on ", hidden.device());
  const int64_t n = rows.size(0), vocab = weight.size(0);
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == hidden.size(0) && idx.size(1) >= 1 && idx.scalar_type() == at::kLong &&
                  idx.is_contiguous() && idx.device() == hidden.device(),
              "dopd: idx must be a contiguous int64 (", hidden.size(0), ", K >= 1) tensor on ", hidden.device(),
              " (a row per hidden row), got ", idx.scalar_type(), " ", idx.sizes());
  TORCH_CHECK(source_logits.sizes() == idx.sizes() && source_logits.scalar_type() == at::kFloat &&
                  source_logits.is_contiguous() && source_logits.device() == hidden.device(),
              "dopd: source_logits must be a contiguous float32 tensor shaped like idx ", idx.sizes());
  check_vector(grad_scale, "grad_scale", n, at::kFloat, hidden);
  TORCH_CHECK(grad_scale.stride(0) == 1 || n <= 1, "dopd: grad_scale must be contiguous");
  if (bias.has_value()) {
    check_vector(*bias, "bias", vocab, at::kFloat, hidden);
    TORCH_CHECK(bias->stride(0) == 1 || vocab <= 1, "dopd: bias must be contiguous");
  }
  auto check_grad = [&](const c10::optional<at::Tensor>& g, const at::Tensor& like, const char* name) {
    if (!g.has_value()) return;
    TORCH_CHECK(g->sizes() == like.sizes() && g->scalar_type() == at::kFloat && g->is_contiguous() &&
                    g->device() == hidden.device(),
                "dopd: ", name, " must be a contiguous float32 tensor of shape ", like.sizes(), " on ",
                hidden.device());
  };
  check_grad(hidden_grad, hidden, "hidden_grad");
  check_grad(weight_grad, weight, "weight_grad");
  if (bias_grad.has_value()) {
    check_vector(*bias_grad, "bias_grad", vocab, at::kFloat, hidden);
    TORCH_CHECK(bias_grad->stride(0) == 1 || vocab <= 1, "dopd: bias_grad must be contiguous");
  }
  check_beta(kind, beta);
  check_scale(scale);
}

}  // namespace dopd
