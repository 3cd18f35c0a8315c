// CPU implementations of winograd_conv3x3, its weight transform and its weight gradient: arguments checked and laid
// out, the 36 GEMMs by at::bmm (MKL's batched SGEMM), the transforms by the kernel table for this CPU
// (winograd_impl.h).

#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>

#include "kernels.h"

namespace fused_resnet {

namespace {

void check_float_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "fused_resnet::", op, ": expected ", name, " of dtype float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), "fused_resnet::", op, ": expected ", name, " on the CPU, got ", t.device());
}

at::Tensor winograd_weight_transform_cpu(const at::Tensor& weight) {
  const char* op = "winograd_weight_transform";
  check_float_cpu(op, "weight", weight);
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3, "fused_resnet::", op,
              ": expected weight of shape (K, C, 3, 3), got ", weight.sizes());
  at::Tensor u = at::empty({kWinogradPoints, weight.size(1), weight.size(0)}, weight.options());
  cpu_kernels().winograd_weight_transform(weight.permute({2, 3, 1, 0}).contiguous(), u);
  return u;
}

at::Tensor winograd_conv3x3_cpu(const at::Tensor& input_, const at::Tensor& weight_transform,
                                const std::optional<at::Tensor>& bias_, const std::optional<at::Tensor>& residual_,
                                bool relu) {
  const char* op = "winograd_conv3x3";
  check_float_cpu(op, "input", input_);
  TORCH_CHECK(input_.dim() == 4, "fused_resnet::", op, ": expected input to be 4-D (N, C, H, W), got shape ",
              input_.sizes());
  TORCH_CHECK(input_.numel() > 0, "fused_resnet::", op, ": expected a non-empty input, got shape ", input_.sizes());
  const int64_t N = input_.size(0), C = input_.size(1), H = input_.size(2), W = input_.size(3);
  check_float_cpu(op, "weight_transform", weight_transform);
  TORCH_CHECK(weight_transform.dim() == 3 && weight_transform.size(0) == kWinogradPoints &&
                  weight_transform.size(1) == C,
              "fused_resnet::", op, ": expected weight_transform of shape (36, ", C,
              ", K) (winograd_weight_transform of a (K, ", C, ", 3, 3) weight), got ", weight_transform.sizes());
  const int64_t K = weight_transform.size(2);
  at::Tensor bias;
  if (bias_.has_value()) {
    check_float_cpu(op, "bias", *bias_);
    TORCH_CHECK(bias_->dim() == 1 && bias_->size(0) == K, "fused_resnet::", op, ": expected bias of shape (", K,
                "), got ", bias_->sizes());
    bias = bias_->contiguous();
  }
  at::Tensor residual;
  if (residual_.has_value()) {
    check_float_cpu(op, "residual", *residual_);
    TORCH_CHECK(residual_->sizes() == at::IntArrayRef({N, K, H, W}), "fused_resnet::", op,
                ": expected residual of the output's shape [", N, ", ", K, ", ", H, ", ", W, "], got ",
                residual_->sizes());
    residual = residual_->contiguous(at::MemoryFormat::ChannelsLast);
  }
  const at::Tensor input = input_.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t tiles = winograd_tiles(N, H, W);
  at::Tensor v = at::empty({kWinogradPoints, tiles, C}, input.options());
  cpu_kernels().winograd_input_transform(input, v);
  const at::Tensor m = at::bmm(v, weight_transform.contiguous());
  at::Tensor out = at::empty({N, K, H, W}, input.options().memory_format(at::MemoryFormat::ChannelsLast));
  cpu_kernels().winograd_output_transform(m, bias, residual, relu, out);
  return out;
}

at::Tensor winograd_conv3x3_weight_grad_cpu(const at::Tensor& input_, const at::Tensor& grad_output_) {
  const char* op = "winograd_conv3x3_weight_grad";
  check_float_cpu(op, "input", input_);
  check_float_cpu(op, "grad_output", grad_output_);
  TORCH_CHECK(input_.dim() == 4 && input_.numel() > 0, "fused_resnet::", op,
              ": expected a non-empty 4-D input (N, C, H, W), got shape ", input_.sizes());
  const int64_t N = input_.size(0), C = input_.size(1), H = input_.size(2), W = input_.size(3);
  TORCH_CHECK(grad_output_.dim() == 4 && grad_output_.size(0) == N && grad_output_.size(2) == H &&
                  grad_output_.size(3) == W,
              "fused_resnet::", op, ": expected grad_output of shape [", N, ", K, ", H, ", ", W,
              "] like the input's, got ", grad_output_.sizes());
  const int64_t K = grad_output_.size(1);
  const at::Tensor input = input_.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor grad_output = grad_output_.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t tiles = winograd_tiles(N, H, W);
  at::Tensor v = at::empty({kWinogradPoints, tiles, C}, input.options());
  cpu_kernels().winograd_input_transform(input, v);
  at::Tensor z = at::empty({kWinogradPoints, tiles, K}, input.options());
  cpu_kernels().winograd_grad_output_transform(grad_output, z);
  const at::Tensor du = at::bmm(v.transpose(1, 2), z);
  at::Tensor grad_filters = at::empty({3, 3, C, K}, input.options());
  cpu_kernels().winograd_weight_grad_transform(du.contiguous(), grad_filters);
  return grad_filters.permute({3, 2, 0, 1}).contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) {
  m.impl("winograd_weight_transform", &winograd_weight_transform_cpu);
  m.impl("winograd_conv3x3", &winograd_conv3x3_cpu);
  m.impl("winograd_conv3x3_weight_grad", &winograd_conv3x3_weight_grad_cpu);
}

}  // namespace fused_resnet
