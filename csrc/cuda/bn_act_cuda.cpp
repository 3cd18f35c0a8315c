// CUDA implementations of the fused_resnet ops: the CPU ops' argument checks, layouts and output dtypes
// (csrc/checks.h), then the kernels of bn_act_kernels.cu on the current stream of the input's device.
// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls in cusparse.h, which a CUDA toolkit may lack.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAMacros.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <type_traits>

#include "../checks.h"
#include "bn_act_kernels.h"

namespace fused_resnet {
namespace {

namespace kernels = fused_resnet::cuda;

kernels::Shape shape_of(const at::Tensor& input) {
  return kernels::Shape{input.size(0), input.size(1), input.size(2) * input.size(3),
                        memory_format_of(input) == at::MemoryFormat::ChannelsLast};
}

template <typename scalar_t>
constexpr kernels::DType dtype_of() {
  if constexpr (std::is_same_v<scalar_t, at::Half>) {
    return kernels::DType::kHalf;
  } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    return kernels::DType::kBFloat16;
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    return kernels::DType::kDouble;
  } else {
    static_assert(std::is_same_v<scalar_t, float>, "the kernels take float, double, half and bfloat16");
    return kernels::DType::kFloat;
  }
}

// The kernels' dtype of `input`, through the same dispatch macro (hence the same error for other floating-point
// dtypes) as the CPU kernels; NAME must be a literal.
#define FUSED_RESNET_KERNEL_DTYPE(input, NAME)                                                       \
  [&] {                                                                                              \
    kernels::DType dtype_{};                                                                         \
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, (input).scalar_type(), NAME,           \
                                    [&] { dtype_ = dtype_of<scalar_t>(); });                         \
    return dtype_;                                                                                   \
  }()

static_assert(kernels::kMaxDevices >= C10_COMPILE_TIME_MAX_GPUS, "the launchers take every CUDA device index");

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "fused_resnet::", op, ": CUDA kernel launch failed: ", cudaGetErrorName(err), ": ",
              cudaGetErrorString(err));
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

at::Tensor workspace_of(size_t bytes, const at::Tensor& input) {
  return at::empty({static_cast<int64_t>(bytes)}, input.options().dtype(at::kByte));
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Every op checks, before anything else, that its input is on a CUDA device, and then runs on that device.
std::tuple<at::Tensor, at::Tensor> batch_stats_cuda(const at::Tensor& input_) {
  constexpr const char* op = "batch_stats";
  check_cuda_input(op, input_);
  const c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor input = dense_input(op, input_);
  const auto acc_options = input.options().dtype(accumulation_dtype(input));
  at::Tensor mean = at::empty({input.size(1)}, acc_options), var = at::empty({input.size(1)}, acc_options);
  const kernels::DType dtype = FUSED_RESNET_KERNEL_DTYPE(input, "batch_stats");
  const kernels::Shape shape = shape_of(input);
  at::Tensor workspace = workspace_of(kernels::batch_stats_workspace_bytes(dtype, shape), input);
  check_launch(op, kernels::batch_stats(dtype, shape, input.const_data_ptr(), mean.mutable_data_ptr(),
                                        var.mutable_data_ptr(), workspace.mutable_data_ptr(), current_stream()));
  return {mean, var};
}

at::Tensor bn_act_cuda(const at::Tensor& input, const std::optional<at::Tensor>& mean, const at::Tensor& scale,
                       const at::Tensor& shift, const std::optional<at::Tensor>& residual,
                       const std::optional<at::Tensor>& residual_mean, const std::optional<at::Tensor>& residual_scale,
                       const std::optional<at::Tensor>& residual_shift, bool relu, int64_t residual_stride,
                       int64_t residual_channel_offset) {
  constexpr const char* op = "bn_act";
  check_cuda_input(op, input);
  const c10::cuda::CUDAGuard guard(input.device());
  const BnActInputs in = bn_act_inputs(input, mean, scale, shift, residual, residual_mean, residual_scale,
                                       residual_shift, residual_stride, residual_channel_offset);
  at::Tensor out = empty_activation(in.input);
  const kernels::DType dtype = FUSED_RESNET_KERNEL_DTYPE(in.input, "bn_act");
  kernels::BnActArgs args{};
  args.input = in.input.const_data_ptr();
  args.mean = in.mean.const_data_ptr();
  args.scale = in.scale.const_data_ptr();
  args.shift = in.shift.const_data_ptr();
  args.residual = ptr_or_null(in.residual);
  args.residual_mean = ptr_or_null(in.residual_mean);
  args.residual_scale = ptr_or_null(in.residual_scale);
  args.residual_shift = ptr_or_null(in.residual_shift);
  args.relu = relu;
  args.out = out.mutable_data_ptr();
  const kernels::Shape shape = shape_of(in.input);
  const int device = in.input.get_device();  // current: see the guard
  if (in.padded) {
    const kernels::PaddedResidual padding{in.residual.size(1), in.residual.size(2), in.residual.size(3),
                                          residual_stride, residual_channel_offset};
    check_launch(op, kernels::bn_act_padded(dtype, shape, in.input.size(2), in.input.size(3), args, padding,
                                            device, current_stream()));
  } else {
    check_launch(op, kernels::bn_act(dtype, shape, args, device, current_stream()));
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_backward_reduce_cuda(
    const at::Tensor& grad_output, const std::optional<at::Tensor>& output, const at::Tensor& input,
    const at::Tensor& mean, const std::optional<at::Tensor>& input2, const std::optional<at::Tensor>& mean2,
    const std::optional<at::Tensor>& mask_scale, const std::optional<at::Tensor>& mask_shift) {
  constexpr const char* op = "bn_act_backward_reduce";
  check_cuda_input(op, input);
  const c10::cuda::CUDAGuard guard(input.device());
  const BackwardReduceInputs in =
      bn_act_backward_reduce_inputs(grad_output, output, input, mean, input2, mean2, mask_scale, mask_shift);
  const int64_t C = in.input.size(1);
  const auto acc_options = in.input.options().dtype(accumulation_dtype(in.input));
  at::Tensor sum_dy = at::empty({C}, acc_options), sum_dy_xmu = at::empty({C}, acc_options);
  at::Tensor sum_dy_xmu2 = at::empty({in.input2.defined() ? C : 0}, acc_options);
  const kernels::DType dtype = FUSED_RESNET_KERNEL_DTYPE(in.input, "bn_act_backward_reduce");
  const kernels::Shape shape = shape_of(in.input);
  at::Tensor workspace =
      workspace_of(kernels::backward_reduce_workspace_bytes(dtype, shape, in.input2.defined()), in.input);
  kernels::ReduceArgs args{};
  args.grad_output = in.grad_output.const_data_ptr();
  args.output = ptr_or_null(in.output);
  args.input = in.input.const_data_ptr();
  args.mean = in.mean.const_data_ptr();
  args.input2 = ptr_or_null(in.input2);
  args.mean2 = ptr_or_null(in.mean2);
  args.mask_scale = ptr_or_null(in.mask_scale);
  args.mask_shift = ptr_or_null(in.mask_shift);
  args.sum_dy = sum_dy.mutable_data_ptr();
  args.sum_dy_xmu = sum_dy_xmu.mutable_data_ptr();
  args.sum_dy_xmu2 = in.input2.defined() ? sum_dy_xmu2.mutable_data_ptr() : nullptr;
  check_launch(op, kernels::backward_reduce(dtype, shape, args, workspace.mutable_data_ptr(), current_stream()));
  return {sum_dy, sum_dy_xmu, sum_dy_xmu2};
}

std::tuple<at::Tensor, at::Tensor> bn_act_backward_elemt_cuda(
    const at::Tensor& grad_output, const std::optional<at::Tensor>& output, const at::Tensor& input,
    const at::Tensor& mean, const at::Tensor& coef_dy, const at::Tensor& coef_xmu, const at::Tensor& coef_const,
    const std::optional<at::Tensor>& input2, const std::optional<at::Tensor>& mean2,
    const std::optional<at::Tensor>& coef2_dy, const std::optional<at::Tensor>& coef2_xmu,
    const std::optional<at::Tensor>& coef2_const, bool residual_grad, const std::optional<at::Tensor>& mask_scale,
    const std::optional<at::Tensor>& mask_shift) {
  constexpr const char* op = "bn_act_backward_elemt";
  check_cuda_input(op, input);
  const c10::cuda::CUDAGuard guard(input.device());
  const BackwardElemtInputs in = bn_act_backward_elemt_inputs(grad_output, output, input, mean, coef_dy, coef_xmu,
                                                              coef_const, input2, mean2, coef2_dy, coef2_xmu,
                                                              coef2_const, residual_grad, mask_scale, mask_shift);
  at::Tensor grad_input = empty_activation(in.input);
  at::Tensor grad_other = in.has_grad_other ? empty_activation(in.input) : at::Tensor();
  const kernels::DType dtype = FUSED_RESNET_KERNEL_DTYPE(in.input, "bn_act_backward_elemt");
  kernels::ElemtArgs args{};
  args.grad_output = in.grad_output.const_data_ptr();
  args.output = ptr_or_null(in.output);
  args.input = in.input.const_data_ptr();
  args.mean = in.mean.const_data_ptr();
  args.coef_dy = in.coef_dy.const_data_ptr();
  args.coef_xmu = in.coef_xmu.const_data_ptr();
  args.coef_const = in.coef_const.const_data_ptr();
  args.input2 = ptr_or_null(in.input2);
  args.mean2 = ptr_or_null(in.mean2);
  args.coef2_dy = ptr_or_null(in.coef2_dy);
  args.coef2_xmu = ptr_or_null(in.coef2_xmu);
  args.coef2_const = ptr_or_null(in.coef2_const);
  args.residual_grad = in.residual_grad;
  args.mask_scale = ptr_or_null(in.mask_scale);
  args.mask_shift = ptr_or_null(in.mask_shift);
  args.grad_input = grad_input.mutable_data_ptr();
  args.grad_other = grad_other.defined() ? grad_other.mutable_data_ptr() : nullptr;
  check_launch(op, kernels::backward_elemt(dtype, shape_of(in.input), args, in.input.get_device(),
                                           current_stream()));
  return {grad_input, output_or_empty(grad_other, in.input)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CUDA, m) {
  m.impl("batch_stats", &batch_stats_cuda);
  m.impl("bn_act", &bn_act_cuda);
  m.impl("bn_act_backward_reduce", &bn_act_backward_reduce_cuda);
  m.impl("bn_act_backward_elemt", &bn_act_backward_elemt_cuda);
}

}  // namespace fused_resnet
