// CPU implementations of the fused_resnet ops: argument checks, layout and allocation, then the kernel table
// for this CPU (kernels_impl.h holds the kernels).

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <atomic>

#include "../checks.h"
#include "kernels.h"

namespace fused_resnet {

namespace {
std::atomic<const CpuKernels*> installed_kernels{nullptr};
}  // namespace

const CpuKernels& cpu_kernels() {
  const CpuKernels* table = installed_kernels.load(std::memory_order_acquire);
  return table != nullptr ? *table : cpu_kernels_default();
}

void use_cpu_kernels(const CpuKernels* table) { installed_kernels.store(table, std::memory_order_release); }

namespace {

std::tuple<at::Tensor, at::Tensor> batch_stats_cpu(const at::Tensor& input_) {
  const at::Tensor input = dense_input("batch_stats", input_);
  const auto dopts = input.options().dtype(at::kDouble);
  at::Tensor mean = at::empty({input.size(1)}, dopts), var = at::empty({input.size(1)}, dopts);
  cpu_kernels().batch_stats(input, mean, var);
  const auto acc_dtype = at::toOpMathType(input.scalar_type());
  return {mean.to(acc_dtype), var.to(acc_dtype)};
}

at::Tensor bn_act_cpu(const at::Tensor& input_, const at::Tensor& scale, const at::Tensor& shift,
                      const std::optional<at::Tensor>& residual_, const std::optional<at::Tensor>& residual_scale_,
                      const std::optional<at::Tensor>& residual_shift_, bool relu, int64_t residual_stride,
                      int64_t residual_channel_offset) {
  constexpr const char* op = "bn_act";
  const at::Tensor input = dense_input(op, input_);
  TORCH_CHECK(residual_scale_.has_value() == residual_shift_.has_value(), "fused_resnet::", op,
              ": residual_scale and residual_shift must be given together");
  TORCH_CHECK(!residual_scale_.has_value() || residual_.has_value(), "fused_resnet::", op,
              ": residual_scale given without a residual");
  at::Tensor out = at::empty_like(input, memory_format_of(input));
  if (check_padded_residual(op, input, residual_, residual_scale_.has_value(), residual_stride,
                            residual_channel_offset)) {
    cpu_kernels().bn_act_padded(input, channel_param_of(op, "scale", scale, input),
                                channel_param_of(op, "shift", shift, input),
                                residual_->contiguous(memory_format_of(input)), residual_stride,
                                residual_channel_offset, relu, out);
    return out;
  }
  const at::Tensor residual = optional_activation(op, "residual", residual_, input);
  cpu_kernels().bn_act(input, channel_param_of(op, "scale", scale, input),
                   channel_param_of(op, "shift", shift, input), residual,
                   optional_channel_param(op, "residual_scale", residual_scale_, input),
                   optional_channel_param(op, "residual_shift", residual_shift_, input), relu, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_backward_reduce_cpu(
    const at::Tensor& grad_output, const std::optional<at::Tensor>& output, const at::Tensor& input_,
    const at::Tensor& mean, const std::optional<at::Tensor>& input2_, const std::optional<at::Tensor>& mean2) {
  constexpr const char* op = "bn_act_backward_reduce";
  const at::Tensor input = dense_input(op, input_);
  TORCH_CHECK(input2_.has_value() == mean2.has_value(), "fused_resnet::", op,
              ": input2 and mean2 must be given together");
  const at::Tensor input2 = optional_activation(op, "input2", input2_, input);
  const int64_t C = input.size(1);
  const auto dopts = input.options().dtype(at::kDouble);
  at::Tensor sum_dy = at::empty({C}, dopts), sum_dy_xmu = at::empty({C}, dopts);
  at::Tensor sum_dy_xmu2 = at::empty({input2.defined() ? C : 0}, dopts);
  cpu_kernels().backward_reduce(activation_of(op, "grad_output", grad_output, input),
                            optional_activation(op, "output", output, input), input,
                            channel_param_of(op, "mean", mean, input), input2,
                            optional_channel_param(op, "mean2", mean2, input), sum_dy, sum_dy_xmu, sum_dy_xmu2);
  const auto acc_dtype = at::toOpMathType(input.scalar_type());
  return {sum_dy.to(acc_dtype), sum_dy_xmu.to(acc_dtype), sum_dy_xmu2.to(acc_dtype)};
}

std::tuple<at::Tensor, at::Tensor> bn_act_backward_elemt_cpu(
    const at::Tensor& grad_output, const std::optional<at::Tensor>& output, const at::Tensor& input_,
    const at::Tensor& mean, const at::Tensor& coef_dy, const at::Tensor& coef_xmu, const at::Tensor& coef_const,
    const std::optional<at::Tensor>& input2_, const std::optional<at::Tensor>& mean2,
    const std::optional<at::Tensor>& coef2_dy, const std::optional<at::Tensor>& coef2_xmu,
    const std::optional<at::Tensor>& coef2_const, bool residual_grad) {
  constexpr const char* op = "bn_act_backward_elemt";
  const at::Tensor input = dense_input(op, input_);
  const bool second = input2_.has_value();
  TORCH_CHECK(second == mean2.has_value() && second == coef2_dy.has_value() && second == coef2_xmu.has_value() &&
                  second == coef2_const.has_value(),
              "fused_resnet::", op, ": input2, mean2 and the coef2_* tensors must be given together");
  TORCH_CHECK(!(second && residual_grad), "fused_resnet::", op,
              ": residual_grad and input2 are exclusive (the second output is one or the other)");
  const at::Tensor input2 = optional_activation(op, "input2", input2_, input);
  at::Tensor grad_input = at::empty_like(input, memory_format_of(input));
  at::Tensor grad_other = (second || residual_grad) ? at::empty_like(input, memory_format_of(input)) : at::Tensor();
  cpu_kernels().backward_elemt(activation_of(op, "grad_output", grad_output, input),
                           optional_activation(op, "output", output, input), input,
                           channel_param_of(op, "mean", mean, input),
                           channel_param_of(op, "coef_dy", coef_dy, input),
                           channel_param_of(op, "coef_xmu", coef_xmu, input),
                           channel_param_of(op, "coef_const", coef_const, input), input2,
                           optional_channel_param(op, "mean2", mean2, input),
                           optional_channel_param(op, "coef2_dy", coef2_dy, input),
                           optional_channel_param(op, "coef2_xmu", coef2_xmu, input),
                           optional_channel_param(op, "coef2_const", coef2_const, input), residual_grad,
                           grad_input, grad_other);
  return {grad_input, grad_other.defined() ? grad_other : at::empty({0}, input.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) {
  m.impl("batch_stats", &batch_stats_cpu);
  m.impl("bn_act", &bn_act_cpu);
  m.impl("bn_act_backward_reduce", &bn_act_backward_reduce_cpu);
  m.impl("bn_act_backward_elemt", &bn_act_backward_elemt_cpu);
}

}  // namespace fused_resnet
