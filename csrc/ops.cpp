// The dopd custom ops: schemas (torch.library, namespace "dopd") and their CPU registrations.
//
// Each op is the fused epilogue of one chunk of fp32 logits on the PyTorch path (dopd_kernels/chunked_*.py);
// its CUDA registration is in cuda/ops_cuda.cpp, its fake (meta) kernel in dopd_kernels/ext/ops.py.
// Logits come in after the model's logit transform (a separate torch step); `scale` multiplies them inside
// the op (the inverse temperature where the caller has not applied it yet), and gradients include it.
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "cpu/kernels.h"

namespace dopd {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> row_stats_cpu(const at::Tensor& logits,
                                                                          const at::Tensor& targets, int64_t k,
                                                                          double scale) {
  auto out = row_stats_outputs(logits, targets, k, scale);
  const at::Tensor y = targets.contiguous();
  cpu::row_stats(logits.data_ptr<float>(), logits.size(0), logits.size(1), logits.stride(0),
                 y.data_ptr<int64_t>(), k, static_cast<float>(scale), out.lse.data_ptr<float>(),
                 out.target_logit.data_ptr<float>(), out.topk_vals.data_ptr<float>(),
                 out.topk_idx.data_ptr<int64_t>());
  return {out.lse, out.target_logit, out.topk_vals, out.topk_idx};
}

std::tuple<at::Tensor, at::Tensor> full_divergence_cpu(at::Tensor& student, at::Tensor& source,
                                                       const at::Tensor& targets, c10::string_view kind,
                                                       double beta, double scale, const at::Tensor& grad_scale,
                                                       double softcap) {
  const Kind k = parse_kind(std::string(kind));
  check_full_divergence(student, source, targets, k, beta, scale, grad_scale, softcap);
  const int64_t rows = student.size(0);
  at::Tensor value = at::empty({rows}, student.options());
  at::Tensor target_logprob = at::empty({rows}, student.options());
  cpu::full_divergence(student.data_ptr<float>(), source.data_ptr<float>(), rows, student.size(1),
                       student.stride(0), source.stride(0), targets.data_ptr<int64_t>(), k,
                       static_cast<float>(beta), static_cast<float>(scale), static_cast<float>(softcap),
                       grad_scale.data_ptr<float>(),
                       value.data_ptr<float>(), target_logprob.data_ptr<float>());
  return {value, target_logprob};
}

at::Tensor topk_divergence_cpu(const at::Tensor& hidden, const at::Tensor& rows, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, const at::Tensor& idx,
                               const at::Tensor& source_logits, c10::string_view kind, double beta, double scale,
                               const at::Tensor& grad_scale, c10::optional<at::Tensor> hidden_grad,
                               c10::optional<at::Tensor> weight_grad, c10::optional<at::Tensor> bias_grad,
                               double logit_scale, double softcap) {
  const Kind k = parse_kind(std::string(kind));
  check_topk_divergence(hidden, rows, weight, bias, idx, source_logits, k, beta, scale, grad_scale, hidden_grad,
                        weight_grad, bias_grad, logit_scale, softcap);
  const int64_t vocab = weight.size(0), n_hidden = hidden.size(0), k_top = idx.size(1);
  const int64_t* ids = idx.data_ptr<int64_t>();
  // Distinct rows (each hidden_grad row is then written by one thread), and their ids in range.
  const int64_t* row_ids = rows.data_ptr<int64_t>();
  std::vector<char> seen(n_hidden, 0);
  for (int64_t i = 0; i < rows.numel(); ++i) {
    const int64_t r = row_ids[i];
    TORCH_CHECK(r >= 0 && r < n_hidden, "dopd: rows holds ", r, ", outside [0, ", n_hidden, ")");
    TORCH_CHECK(!seen[r], "dopd: rows holds ", r, " twice; rows must be distinct");
    seen[r] = 1;
    for (int64_t j = 0; j < k_top; ++j) {
      const int64_t id = ids[r * k_top + j];
      TORCH_CHECK(id >= 0 && id < vocab, "dopd: idx holds ", id, ", outside [0, ", vocab, ")");
    }
  }
  at::Tensor value = at::empty({rows.size(0)}, hidden.options());
  cpu::topk_divergence(hidden.data_ptr<float>(), hidden.size(1), row_ids, rows.size(0), weight.data_ptr<float>(),
                       vocab, weight.stride(0), bias.has_value() ? bias->data_ptr<float>() : nullptr, ids,
                       k_top, source_logits.data_ptr<float>(), k, static_cast<float>(beta),
                       static_cast<float>(scale), static_cast<float>(logit_scale), static_cast<float>(softcap),
                       grad_scale.data_ptr<float>(), value.data_ptr<float>(),
                       hidden_grad.has_value() ? hidden_grad->data_ptr<float>() : nullptr,
                       weight_grad.has_value() ? weight_grad->data_ptr<float>() : nullptr,
                       bias_grad.has_value() ? bias_grad->data_ptr<float>() : nullptr);
  return value;
}

}  // namespace

TORCH_LIBRARY(dopd, m) {
  // Per row of scale * logits (C, V): log-sum-exp, the target's logit, the top-k (values descending, exact
  // ties by lower id; ids int64). A target outside [0, V) gives a NaN logit.
  m.def("row_stats(Tensor logits, Tensor targets, int k, float scale=1.0) "
        "-> (Tensor lse, Tensor target_logit, Tensor topk_vals, Tensor topk_idx)");
  // Per row of the (C, V) student and source logits: the divergence `kind` between their softmaxes (of scale *
  // logits) and the student's target log-prob; student is overwritten with grad_scale * dD/d student, source
  // is scratch (overwritten). softcap > 0: student holds soft-capped logits and the gradient is taken before
  // the cap (times 1 - (student / softcap)^2).
  m.def("full_divergence_(Tensor(a!) student, Tensor(b!) source, Tensor targets, str kind, float beta, "
        "float scale, Tensor grad_scale, float softcap=0.0) -> (Tensor value, Tensor student_target_logprob)");
  // Per row r = rows[i] (R distinct ids into the N rows of hidden (N, H), idx and source_logits (N, K)): the
  // divergence over the source's K ids idx[r] between the student's renormalized softmax of scale * (hidden[r]
  // W[idx[r]]^T + b[idx[r]]) and softmax(source_logits[r]); returns it (R,) and accumulates grad_scale * dD/d
  // hidden, W, b into hidden_grad
  // (N, H), weight_grad (V, H) and bias_grad (V,) where given. The model's logit transform (logit_scale, then
  // softcap > 0: softcap * tanh(. / softcap)) is applied to the student's logits before scale, inside the op.
  m.def("topk_divergence(Tensor hidden, Tensor rows, Tensor weight, Tensor? bias, Tensor idx, Tensor source_logits, "
        "str kind, float beta, float scale, Tensor grad_scale, Tensor(a!)? hidden_grad, Tensor(b!)? weight_grad, "
        "Tensor(c!)? bias_grad, float logit_scale=1.0, float softcap=0.0) -> Tensor value");
}

TORCH_LIBRARY_IMPL(dopd, CPU, m) {
  m.impl("row_stats", &row_stats_cpu);
  m.impl("full_divergence_", &full_divergence_cpu);
  m.impl("topk_divergence", &topk_divergence_cpu);
}

}  // namespace dopd
