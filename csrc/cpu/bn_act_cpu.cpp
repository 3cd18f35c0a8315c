// CPU implementations of the fused_resnet ops: the arguments checked and laid out by csrc/checks.h, outputs
// allocated, then the kernel table for this CPU (kernels_impl.h holds the kernels).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
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
  const auto opts = input.options().dtype(accumulation_dtype(input));
  at::Tensor mean = at::empty({input.size(1)}, opts), var = at::empty({input.size(1)}, opts);
  cpu_kernels().batch_stats(input, mean, var);
  return {mean, var};
}

at::Tensor bn_act_cpu(const at::Tensor& input, const std::optional<at::Tensor>& mean, const at::Tensor& scale,
                      const at::Tensor& shift, const std::optional<at::Tensor>& residual,
                      const std::optional<at::Tensor>& residual_mean, const std::optional<at::Tensor>& residual_scale,
                      const std::optional<at::Tensor>& residual_shift, bool relu, int64_t residual_stride,
                      int64_t residual_channel_offset) {
  const BnActInputs in = bn_act_inputs(input, mean, scale, shift, residual, residual_mean, residual_scale,
                                       residual_shift, residual_stride, residual_channel_offset);
  at::Tensor out = empty_activation(in.input);
  if (in.padded) {
    cpu_kernels().bn_act_padded(in.input, in.mean, in.scale, in.shift, in.residual, residual_stride,
                                residual_channel_offset, relu, out);
  } else {
    cpu_kernels().bn_act(in.input, in.mean, in.scale, in.shift, in.residual, in.residual_mean, in.residual_scale,
                         in.residual_shift, relu, out);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_backward_reduce_cpu(
    const at::Tensor& grad_output, const std::optional<at::Tensor>& output, const at::Tensor& input,
    const at::Tensor& mean, const std::optional<at::Tensor>& input2, const std::optional<at::Tensor>& mean2,
    const std::optional<at::Tensor>& mask_scale, const std::optional<at::Tensor>& mask_shift) {
  const BackwardReduceInputs in =
      bn_act_backward_reduce_inputs(grad_output, output, input, mean, input2, mean2, mask_scale, mask_shift);
  const int64_t C = in.input.size(1);
  const auto opts = in.input.options().dtype(accumulation_dtype(in.input));
  at::Tensor sum_dy = at::empty({C}, opts), sum_dy_xmu = at::empty({C}, opts);
  at::Tensor sum_dy_xmu2 = at::empty({in.input2.defined() ? C : 0}, opts);
  cpu_kernels().backward_reduce(in.grad_output, in.output, in.input, in.mean, in.input2, in.mean2, in.mask_scale,
                                in.mask_shift, sum_dy, sum_dy_xmu, sum_dy_xmu2);
  return {sum_dy, sum_dy_xmu, sum_dy_xmu2};
}

std::tuple<at::Tensor, at::Tensor> bn_act_backward_elemt_cpu(
    const at::Tensor& grad_output, const std::optional<at::Tensor>& output, const at::Tensor& input,
    const at::Tensor& mean, const at::Tensor& coef_dy, const at::Tensor& coef_xmu, const at::Tensor& coef_const,
    const std::optional<at::Tensor>& input2, const std::optional<at::Tensor>& mean2,
    const std::optional<at::Tensor>& coef2_dy, const std::optional<at::Tensor>& coef2_xmu,
    const std::optional<at::Tensor>& coef2_const, bool residual_grad, const std::optional<at::Tensor>& mask_scale,
    const std::optional<at::Tensor>& mask_shift) {
  const BackwardElemtInputs in = bn_act_backward_elemt_inputs(grad_output, output, input, mean, coef_dy, coef_xmu,
                                                              coef_const, input2, mean2, coef2_dy, coef2_xmu,
                                                              coef2_const, residual_grad, mask_scale, mask_shift);
  at::Tensor grad_input = empty_activation(in.input);
  at::Tensor grad_other = in.has_grad_other ? empty_activation(in.input) : at::Tensor();
  cpu_kernels().backward_elemt(in.grad_output, in.output, in.input, in.mean, in.coef_dy, in.coef_xmu, in.coef_const,
                               in.input2, in.mean2, in.coef2_dy, in.coef2_xmu, in.coef2_const, in.residual_grad,
                               in.mask_scale, in.mask_shift, grad_input, grad_other);
  return {grad_input, output_or_empty(grad_other, in.input)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) {
  m.impl("batch_stats", &batch_stats_cpu);
  m.impl("bn_act", &bn_act_cpu);
  m.impl("bn_act_backward_reduce", &bn_act_backward_reduce_cpu);
  m.impl("bn_act_backward_elemt", &bn_act_backward_elemt_cpu);
}

}  // namespace fused_resnet
