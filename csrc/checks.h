// Argument checks shared by the CPU and CUDA implementations of the fused_resnet ops.
// Each failure names the op, the argument, what was expected and what came.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

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

}  // namespace fused_resnet
