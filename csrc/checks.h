// Argument checks and layout helpers shared by the CPU and CUDA implementations of the fused_resnet ops, so
// that both accept the same arguments, raise the same messages and hand their kernels the same layouts.
// Each failure names the op, the argument, what was expected and what came.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace fused_resnet {

// A 4-D floating-point activation (N, C, H, W), in any memory format (kernels make it dense).
inline void check_activation(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4, "fused_resnet::", op, ": expected ", name, " to be 4-D (N, C, H, W), got ", t.dim(),
              "-D with shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "fused_resnet::", op, ": expected ", name,
              " to be a floating-point tensor, got ", t.scalar_type());
}

// A tensor that must match `ref` in shape, dtype and device.
inline void check_same_activation(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK(t.sizes() == ref.sizes(), "fused_resnet::", op, ": expected ", name, " of shape ", ref.sizes(),
              ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "fused_resnet::", op, ": expected ", name, " of dtype ",
              ref.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "fused_resnet::", op, ": expected ", name, " on ", ref.device(), ", got ",
              t.device());
}

// A per-channel vector of C values, returned contiguous in the accumulation dtype.
inline at::Tensor channel_param(const char* op, const char* name, const at::Tensor& t, int64_t channels,
                                at::ScalarType acc_dtype) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, "fused_resnet::", op, ": expected ", name,
              " to be a vector of ", channels, " per-channel values, got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "fused_resnet::", op, ": expected ", name,
              " to be floating-point, got ", t.scalar_type());
  return t.to(acc_dtype).contiguous();
}

// A tensor that must be on the device of `ref` (the CPU kernels never see a device mismatch: the dispatcher
// sends any call with a CUDA tensor to the CUDA implementation, which must reject the CPU ones).
inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), "fused_resnet::", op, ": expected ", name, " on ", ref.device(), ", got ",
              t.device());
}

// All activations of one call share the layout of `input`: NCHW-contiguous or channels_last.
inline at::MemoryFormat memory_format_of(const at::Tensor& input) {
  return input.suggest_memory_format() == at::MemoryFormat::ChannelsLast ? at::MemoryFormat::ChannelsLast
                                                                          : at::MemoryFormat::Contiguous;
}

// The checked `input` of an op, made dense in its layout.
inline at::Tensor dense_input(const char* op, const at::Tensor& input) {
  check_activation(op, "input", input);
  TORCH_CHECK(input.numel() > 0, "fused_resnet::", op, ": expected a non-empty input, got shape ", input.sizes());
  return input.contiguous(memory_format_of(input));
}

// An activation matching `input` in shape, dtype and device, made dense in its layout.
inline at::Tensor activation_of(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input) {
  check_same_activation(op, name, t, input);
  return t.contiguous(memory_format_of(input));
}

// An optional activation matching `input`, made dense in its layout; undefined when absent.
inline at::Tensor optional_activation(const char* op, const char* name, const std::optional<at::Tensor>& t,
                                      const at::Tensor& input) {
  return t.has_value() ? activation_of(op, name, *t, input) : at::Tensor();
}

// A per-channel vector for `input`, contiguous in its accumulation dtype.
inline at::Tensor channel_param_of(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input) {
  return channel_param(op, name, t, input.size(1), at::toOpMathType(input.scalar_type()));
}

inline at::Tensor optional_channel_param(const char* op, const char* name, const std::optional<at::Tensor>& t,
                                         const at::Tensor& input) {
  return t.has_value() ? channel_param_of(op, name, *t, input) : at::Tensor();
}

// Whether bn_act's residual is option A's (subsampled and zero-padded in channels) rather than an identity, and
// if so that it fits `input`: same batch, dtype and device; input's height and width are its own subsampled by
// `stride`; its channels land inside input's from `offset`.
inline bool check_padded_residual(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& residual,
                                  bool affine, int64_t stride, int64_t offset) {
  const bool padded = stride != 1 || offset != 0 || (residual.has_value() && residual->dim() == 4 &&
                                                     residual->size(1) != input.size(1));
  if (!padded) return false;
  TORCH_CHECK(residual.has_value(), "fused_resnet::", op, ": residual_stride and residual_channel_offset need a residual");
  TORCH_CHECK(!affine, "fused_resnet::", op, ": a subsampled or channel-padded residual takes no residual_scale");
  const at::Tensor& r = *residual;
  check_activation(op, "residual", r);
  TORCH_CHECK(stride >= 1, "fused_resnet::", op, ": expected residual_stride >= 1, got ", stride);
  TORCH_CHECK(offset >= 0 && offset + r.size(1) <= input.size(1), "fused_resnet::", op, ": a residual of ", r.size(1),
              " channels at residual_channel_offset ", offset, " does not fit the input's ", input.size(1), " channels");
  TORCH_CHECK(r.size(0) == input.size(0) && (r.size(2) - 1) / stride + 1 == input.size(2) &&
                  (r.size(3) - 1) / stride + 1 == input.size(3),
              "fused_resnet::", op, ": a residual of shape ", r.sizes(), " subsampled by ", stride,
              " does not match the input of shape ", input.sizes());
  TORCH_CHECK(r.scalar_type() == input.scalar_type(), "fused_resnet::", op, ": expected residual of dtype ",
              input.scalar_type(), ", got ", r.scalar_type());
  TORCH_CHECK(r.device() == input.device(), "fused_resnet::", op, ": expected residual on ", input.device(), ", got ",
              r.device());
  return true;
}

}  // namespace fused_resnet
