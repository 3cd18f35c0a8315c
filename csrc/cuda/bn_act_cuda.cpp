// CUDA implementations of the fused_resnet ops: the CPU ops' argument checks, layouts and output dtypes
// (csrc/checks.h), then the kernels of bn_act_kernels.cu on the current stream of the input's device.
// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls in cusparse.h, which a CUDA toolkit may lack.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAMacros.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <atomic>
#include <type_traits>

#include "../checks.h"
#include "bn_act_kernels.h"

namespace fused_resnet {
namespace {

namespace kernels = fused_resnet::cuda;

// The dispatcher sends a call here when any tensor argument is on a CUDA device, not necessarily `input`, whose
// device the outputs and the kernels use.
void check_cuda_input(const char* op, const at::Tensor& input) {
  TORCH_CHECK(input.is_cuda(), "fused_resnet::", op, ": expected input on a CUDA device, got ", input.device());
}

// channel_param_of, and on the input's device: the kernels dereference it there.
at::Tensor device_channel_param(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input) {
  at::Tensor param = channel_param_of(op, name, t, input);
  check_same_device(op, name, param, input);
  return param;
}

at::Tensor optional_device_channel_param(const char* op, const char* name, const std::optional<at::Tensor>& t,
                                         const at::Tensor& input) {
  return t.has_value() ? device_channel_param(op, name, *t, input) : at::Tensor();
}

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

// Multiprocessors of a device, queried once per device (a benign race stores the same value twice).
int multiprocessor_count(c10::DeviceIndex device) {
  static std::atomic<int> counts[C10_COMPILE_TIME_MAX_GPUS];  // 0: not queried yet
  TORCH_CHECK(device >= 0 && device < C10_COMPILE_TIME_MAX_GPUS, "fused_resnet: CUDA device index ", int(device),
              " out of range");
  int count = counts[device].load(std::memory_order_relaxed);
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    counts[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "fused_resnet::", op, ": CUDA kernel launch failed: ", cudaGetErrorName(err), ": ",
              cudaGetErrorString(err));
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

at::Tensor workspace_of(size_t bytes, const at::Tensor& input) {
  return at::empty({static_cast<int64_t>(bytes)}, input.options().dtype(at::kByte));
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

std::tuple<at::Tensor, at::Tensor> batch_stats_cuda(const at::Tensor& input_) {
  constexpr const char* op = "batch_stats";
  check_cuda_input(op, input_);
  const c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor input = dense_input(op, input_);
  const auto acc_options = input.options().dtype(at::toOpMathType(input.scalar_type()));
  at::Tensor mean = at::empty({input.size(1)}, acc_options), var = at::empty({input.size(1)}, acc_options);
  const kernels::DType dtype = FUSED_RESNET_KERNEL_DTYPE(input, "batch_stats");
  const kernels::Shape shape = shape_of(input);
  at::Tensor workspace = workspace_of(kernels::batch_stats_workspace_bytes(dtype, shape), input);
  check_launch(op, kernels::batch_stats(dtype, shape, input.const_data_ptr(), mean.mutable_data_ptr(),
                                        var.mutable_data_ptr(), workspace.mutable_data_ptr(), current_stream()));
  return {mean, var};
}

at::Tensor bn_act_cuda(const at::Tensor& input_, const at::Tensor& scale_, const at::Tensor& shift_,
                       const std::optional<at::Tensor>& residual_, const std::optional<at::Tensor>& residual_scale_,
                       const std::optional<at::Tensor>& residual_shift_, bool relu, int64_t residual_stride,
                       int64_t residual_channel_offset) {
  constexpr const char* op = "bn_act";
  check_cuda_input(op, input_);
  const c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor input = dense_input(op, input_);
  TORCH_CHECK(residual_scale_.has_value() == residual_shift_.has_value(), "fused_resnet::", op,
              ": residual_scale and residual_shift must be given together");
  TORCH_CHECK(!residual_scale_.has_value() || residual_.has_value(), "fused_resnet::", op,
              ": residual_scale given without a residual");
  const bool padded = check_padded_residual(op, input, residual_, residual_scale_.has_value(), residual_stride,
                                            residual_channel_offset);
  const at::Tensor residual = padded ? residual_->contiguous(memory_format_of(input))
                                     : optional_activation(op, "residual", residual_, input);
  const at::Tensor scale = device_channel_param(op, "scale", scale_, input);
  const at::Tensor shift = device_channel_param(op, "shift", shift_, input);
  const at::Tensor residual_scale = optional_device_channel_param(op, "residual_scale", residual_scale_, input);
  const at::Tensor residual_shift = optional_device_channel_param(op, "residual_shift", residual_shift_, input);
  at::Tensor out = at::empty_like(input, memory_format_of(input));
  const kernels::DType dtype = FUSED_RESNET_KERNEL_DTYPE(input, "bn_act");
  kernels::BnActArgs args{};
  args.input = input.const_data_ptr();
  args.scale = scale.const_data_ptr();
  args.shift = shift.const_data_ptr();
  args.residual = ptr_or_null(residual);
  args.residual_scale = ptr_or_null(residual_scale);
  args.residual_shift = ptr_or_null(residual_shift);
  args.relu = relu;
  args.out = out.mutable_data_ptr();
  const int multiprocessors = multiprocessor_count(input.get_device());
  if (padded) {
    const kernels::Shape shape = shape_of(input);
    const kernels::PaddedResidual padding{residual.size(1), residual.size(2), residual.size(3), residual_stride,
                                          residual_channel_offset};
    check_launch(op, kernels::bn_act_padded(dtype, shape, input.size(2), input.size(3), args, padding,
                                            multiprocessors, current_stream()));
    return out;
  }
  check_launch(op, kernels::bn_act(dtype, shape_of(input), args, multiprocessors, current_stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_backward_reduce_cuda(
    const at::Tensor& grad_output_, const std::optional<at::Tensor>& output_, const at::Tensor& input_,
    const at::Tensor& mean_, const std::optional<at::Tensor>& input2_, const std::optional<at::Tensor>& mean2_) {
  constexpr const char* op = "bn_act_backward_reduce";
  check_cuda_input(op, input_);
  const c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor input = dense_input(op, input_);
  TORCH_CHECK(input2_.has_value() == mean2_.has_value(), "fused_resnet::", op,
              ": input2 and mean2 must be given together");
  const at::Tensor input2 = optional_activation(op, "input2", input2_, input);
  const at::Tensor grad_output = activation_of(op, "grad_output", grad_output_, input);
  const at::Tensor output = optional_activation(op, "output", output_, input);
  const at::Tensor mean = device_channel_param(op, "mean", mean_, input);
  const at::Tensor mean2 = optional_device_channel_param(op, "mean2", mean2_, input);
  const int64_t C = input.size(1);
  const auto acc_options = input.options().dtype(at::toOpMathType(input.scalar_type()));
  at::Tensor sum_dy = at::empty({C}, acc_options), sum_dy_xmu = at::empty({C}, acc_options);
  at::Tensor sum_dy_xmu2 = at::empty({input2.defined() ? C : 0}, acc_options);
  const kernels::DType dtype = FUSED_RESNET_KERNEL_DTYPE(input, "bn_act_backward_reduce");
  const kernels::Shape shape = shape_of(input);
  at::Tensor workspace =
      workspace_of(kernels::backward_reduce_workspace_bytes(dtype, shape, input2.defined()), input);
  kernels::ReduceArgs args{};
  args.grad_output = grad_output.const_data_ptr();
  args.output = ptr_or_null(output);
  args.input = input.const_data_ptr();
  args.mean = mean.const_data_ptr();
  args.input2 = ptr_or_null(input2);
  args.mean2 = ptr_or_null(mean2);
  args.sum_dy = sum_dy.mutable_data_ptr();
  args.sum_dy_xmu = sum_dy_xmu.mutable_data_ptr();
  args.sum_dy_xmu2 = input2.defined() ? sum_dy_xmu2.mutable_data_ptr() : nullptr;
  check_launch(op, kernels::backward_reduce(dtype, shape, args, workspace.mutable_data_ptr(), current_stream()));
  return {sum_dy, sum_dy_xmu, sum_dy_xmu2};
}

std::tuple<at::Tensor, at::Tensor> bn_act_backward_elemt_cuda(
    const at::Tensor& grad_output_, const std::optional<at::Tensor>& output_, const at::Tensor& input_,
    const at::Tensor& mean_, const at::Tensor& coef_dy_, const at::Tensor& coef_xmu_, const at::Tensor& coef_const_,
    const std::optional<at::Tensor>& input2_, const std::optional<at::Tensor>& mean2_,
    const std::optional<at::Tensor>& coef2_dy_, const std::optional<at::Tensor>& coef2_xmu_,
    const std::optional<at::Tensor>& coef2_const_, bool residual_grad) {
  constexpr const char* op = "bn_act_backward_elemt";
  check_cuda_input(op, input_);
  const c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor input = dense_input(op, input_);
  const bool second = input2_.has_value();
  TORCH_CHECK(second == mean2_.has_value() && second == coef2_dy_.has_value() && second == coef2_xmu_.has_value() &&
                  second == coef2_const_.has_value(),
              "fused_resnet::", op, ": input2, mean2 and the coef2_* tensors must be given together");
  TORCH_CHECK(!(second && residual_grad), "fused_resnet::", op,
              ": residual_grad and input2 are exclusive (the second output is one or the other)");
  const at::Tensor input2 = optional_activation(op, "input2", input2_, input);
  const at::Tensor grad_output = activation_of(op, "grad_output", grad_output_, input);
  const at::Tensor output = optional_activation(op, "output", output_, input);
  const at::Tensor mean = device_channel_param(op, "mean", mean_, input);
  const at::Tensor coef_dy = device_channel_param(op, "coef_dy", coef_dy_, input);
  const at::Tensor coef_xmu = device_channel_param(op, "coef_xmu", coef_xmu_, input);
  const at::Tensor coef_const = device_channel_param(op, "coef_const", coef_const_, input);
  const at::Tensor mean2 = optional_device_channel_param(op, "mean2", mean2_, input);
  const at::Tensor coef2_dy = optional_device_channel_param(op, "coef2_dy", coef2_dy_, input);
  const at::Tensor coef2_xmu = optional_device_channel_param(op, "coef2_xmu", coef2_xmu_, input);
  const at::Tensor coef2_const = optional_device_channel_param(op, "coef2_const", coef2_const_, input);
  at::Tensor grad_input = at::empty_like(input, memory_format_of(input));
  at::Tensor grad_other = (second || residual_grad) ? at::empty_like(input, memory_format_of(input)) : at::Tensor();
  const kernels::DType dtype = FUSED_RESNET_KERNEL_DTYPE(input, "bn_act_backward_elemt");
  kernels::ElemtArgs args{};
  args.grad_output = grad_output.const_data_ptr();
  args.output = ptr_or_null(output);
  args.input = input.const_data_ptr();
  args.mean = mean.const_data_ptr();
  args.coef_dy = coef_dy.const_data_ptr();
  args.coef_xmu = coef_xmu.const_data_ptr();
  args.coef_const = coef_const.const_data_ptr();
  args.input2 = ptr_or_null(input2);
  args.mean2 = ptr_or_null(mean2);
  args.coef2_dy = ptr_or_null(coef2_dy);
  args.coef2_xmu = ptr_or_null(coef2_xmu);
  args.coef2_const = ptr_or_null(coef2_const);
  args.residual_grad = residual_grad;
  args.grad_input = grad_input.mutable_data_ptr();
  args.grad_other = grad_other.defined() ? grad_other.mutable_data_ptr() : nullptr;
  check_launch(op, kernels::backward_elemt(dtype, shape_of(input), args, multiprocessor_count(input.get_device()),
                                           current_stream()));
  return {grad_input, grad_other.defined() ? grad_other : at::empty({0}, input.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CUDA, m) {
  m.impl("batch_stats", &batch_stats_cuda);
  m.impl("bn_act", &bn_act_cuda);
  m.impl("bn_act_backward_reduce", &bn_act_backward_reduce_cuda);
  m.impl("bn_act_backward_elemt", &bn_act_backward_elemt_cuda);
}

}  // namespace fused_resnet
