// CUDA registrations of the dopd ops: the checks of ../checks.h, then the launchers of the .cu files on the
// current stream. Host C++ only, with no CUDA header: the stream comes from c10's device-generic guard
// interface (CUDAGuardImpl behind it), so this file compiles with the headers of any torch build.
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include <limits>

#include "../checks.h"
#include "launch.h"

namespace dopd {
namespace {

void* current_stream(const at::Tensor& t) {
  c10::impl::VirtualGuardImpl guard_impl(c10::DeviceType::CUDA);
  return guard_impl.getStreamNativeHandle(guard_impl.getStream(t.device()));
}

void check_launch(int code, const char* op) {
  TORCH_CHECK(code == 0, "dopd::", op, ": CUDA launch failed: ", cuda::error_string(code));
}

void check_grid(int64_t rows) {
  TORCH_CHECK(rows < std::numeric_limits<int32_t>::max(), "dopd: at most 2^31 - 1 rows per call on CUDA");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> row_stats_cuda(const at::Tensor& logits,
                                                                           const at::Tensor& targets, int64_t k,
                                                                           double scale) {
  c10::DeviceGuard guard(logits.device());
  TORCH_CHECK(k <= cuda::kMaxTopK, "dopd::row_stats: k must be <= ", cuda::kMaxTopK, " on CUDA, got ", k);
  auto out = row_stats_outputs(logits, targets, k, scale);
  check_grid(logits.size(0));
  const at::Tensor y = targets.contiguous();
  check_launch(cuda::row_stats(logits.data_ptr<float>(), logits.size(0), logits.size(1), logits.stride(0),
                               y.data_ptr<int64_t>(), k, static_cast<float>(scale), out.lse.data_ptr<float>(),
                               out.target_logit.data_ptr<float>(), out.topk_vals.data_ptr<float>(),
                               out.topk_idx.data_ptr<int64_t>(), current_stream(logits)),
               "row_stats");
  return {out.lse, out.target_logit, out.topk_vals, out.topk_idx};
}

std::tuple<at::Tensor, at::Tensor> full_divergence_cuda(at::Tensor& student, at::Tensor& source,
                                                        const at::Tensor& targets, c10::string_view kind,
                                                        double beta, double scale, const at::Tensor& grad_scale,
                                                        double softcap) {
  c10::DeviceGuard guard(student.device());
  const Kind k = parse_kind(std::string(kind));
  check_full_divergence(student, source, targets, k, beta, scale, grad_scale, softcap);
  check_grid(student.size(0));
  const int64_t rows = student.size(0);
  at::Tensor value = at::empty({rows}, student.options());
  at::Tensor target_logprob = at::empty({rows}, student.options());
  check_launch(cuda::full_divergence(student.data_ptr<float>(), source.data_ptr<float>(), rows, student.size(1),
                                     student.stride(0), source.stride(0), targets.data_ptr<int64_t>(), k,
                                     static_cast<float>(beta), static_cast<float>(scale),
                                     static_cast<float>(softcap), grad_scale.data_ptr<float>(),
                                     value.data_ptr<float>(), target_logprob.data_ptr<float>(),
                                     current_stream(student)),
               "full_divergence_");
  return {value, target_logprob};
}

at::Tensor topk_divergence_cuda(const at::Tensor& hidden, const at::Tensor& rows, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias, const at::Tensor& idx,
                                const at::Tensor& source_logits, c10::string_view kind, double beta, double scale,
                                const at::Tensor& grad_scale, c10::optional<at::Tensor> hidden_grad,
                                c10::optional<at::Tensor> weight_grad, c10::optional<at::Tensor> bias_grad,
                                double logit_scale, double softcap) {
  c10::DeviceGuard guard(hidden.device());
  const Kind k = parse_kind(std::string(kind));
  check_topk_divergence(hidden, rows, weight, bias, idx, source_logits, k, beta, scale, grad_scale, hidden_grad,
                        weight_grad, bias_grad, logit_scale, softcap);
  TORCH_CHECK(idx.size(1) <= cuda::kMaxTopK, "dopd::topk_divergence: K must be <= ", cuda::kMaxTopK, " on CUDA");
  check_grid(rows.size(0));
  // ids outside [0, V) and rows outside [0, N) stop the kernel (no host sync to check them here); rows may
  // repeat on CUDA (atomic d hidden), the CPU kernel refuses repeats: callers pass distinct rows
  at::Tensor value = at::empty({rows.size(0)}, hidden.options());
  check_launch(cuda::topk_divergence(hidden.data_ptr<float>(), hidden.size(0), hidden.size(1), rows.data_ptr<int64_t>(),
                                     rows.size(0),
                                     weight.data_ptr<float>(), weight.size(0), weight.stride(0),
                                     bias.has_value() ? bias->data_ptr<float>() : nullptr, idx.data_ptr<int64_t>(),
                                     idx.size(1), source_logits.data_ptr<float>(), k, static_cast<float>(beta),
                                     static_cast<float>(scale), static_cast<float>(logit_scale),
                                     static_cast<float>(softcap), grad_scale.data_ptr<float>(), value.data_ptr<float>(),
                                     hidden_grad.has_value() ? hidden_grad->data_ptr<float>() : nullptr,
                                     weight_grad.has_value() ? weight_grad->data_ptr<float>() : nullptr,
                                     bias_grad.has_value() ? bias_grad->data_ptr<float>() : nullptr,
                                     current_stream(hidden)),
               "topk_divergence");
  return value;
}

}  // namespace

TORCH_LIBRARY_IMPL(dopd, CUDA, m) {
  m.impl("row_stats", &row_stats_cuda);
  m.impl("full_divergence_", &full_divergence_cuda);
  m.impl("topk_divergence", &topk_divergence_cuda);
}

}  // namespace dopd
