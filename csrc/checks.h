// The argument checks of the fused_resnet ops, and the layouts they hand their kernels: the one place where the
// compiled ops validate, shared by the CPU and CUDA implementations, so that both accept the same arguments, raise
// the same messages in the same order and give their kernels the same layouts. Each failure names the op, the
// argument, what was expected and what came.
//
// Each op's arguments go through one function here (batch_stats: dense_input; bn_act_inputs,
// bn_act_backward_reduce_inputs, bn_act_backward_elemt_inputs), which returns them checked: activations dense in
// the layout of `input`, per-channel vectors contiguous in the accumulation dtype on input's device, absent
// optional arguments as undefined tensors.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <optional>

namespace fused_resnet {

// The dtype of per-channel statistics and coefficients for activations like `input`: fp32 for fp16/bf16/fp32,
// fp64 for fp64.
inline at::ScalarType accumulation_dtype(const at::Tensor& input) { return at::toOpMathType(input.scalar_type()); }

// All activations of one call share the layout of `input`: NCHW-contiguous or channels_last.
inline at::MemoryFormat memory_format_of(const at::Tensor& input) {
  return input.suggest_memory_format() == at::MemoryFormat::ChannelsLast ? at::MemoryFormat::ChannelsLast
                                                                          : at::MemoryFormat::Contiguous;
}

// An uninitialized output activation shaped like `input`, dense in its layout.
inline at::Tensor empty_activation(const at::Tensor& input) { return at::empty_like(input, memory_format_of(input)); }

// An output that a call may not have, as the op returns it: its schema returns a tensor, so an empty one.
inline at::Tensor output_or_empty(const at::Tensor& output, const at::Tensor& input) {
  return output.defined() ? output : at::empty({0}, input.options());
}

// A 4-D floating-point activation (N, C, H, W), in any memory format (kernels make it dense).
inline void check_activation(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4, "fused_resnet::", op, ": expected ", name, " to be 4-D (N, C, H, W), got ", t.dim(),
              "-D with shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "fused_resnet::", op, ": expected ", name,
              " to be a floating-point tensor, got ", t.scalar_type());
}

// A tensor that must have the dtype of `ref`.
inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "fused_resnet::", op, ": expected ", name, " of dtype ",
              ref.scalar_type(), ", got ", t.scalar_type());
}

// A tensor that must be on the device of `ref`. Only the CUDA implementations meet a mismatch: the dispatcher sends
// them any call with a CUDA tensor, CPU tensors and all.
inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), "fused_resnet::", op, ": expected ", name, " on ", ref.device(), ", got ",
              t.device());
}

// The dispatcher sends a call to the CUDA implementation when any tensor argument is on a CUDA device, not
// necessarily `input`, whose device the outputs and the kernels use.
inline void check_cuda_input(const char* op, const at::Tensor& input) {
  TORCH_CHECK(input.is_cuda(), "fused_resnet::", op, ": expected input on a CUDA device, got ", input.device());
}

// The checked `input` of an op, made dense in its layout.
inline at::Tensor dense_input(const char* op, const at::Tensor& input) {
  check_activation(op, "input", input);
  TORCH_CHECK(input.numel() > 0, "fused_resnet::", op, ": expected a non-empty input, got shape ", input.sizes());
  return input.contiguous(memory_format_of(input));
}

// An activation matching `input` in shape, dtype and device, made dense in its layout.
inline at::Tensor activation_of(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input) {
  TORCH_CHECK(t.sizes() == input.sizes(), "fused_resnet::", op, ": expected ", name, " of shape ", input.sizes(),
              ", got ", t.sizes());
  check_same_dtype(op, name, t, input);
  check_same_device(op, name, t, input);
  return t.contiguous(memory_format_of(input));
}

// An optional activation matching `input`, made dense in its layout; undefined when absent.
inline at::Tensor optional_activation(const char* op, const char* name, const std::optional<at::Tensor>& t,
                                      const at::Tensor& input) {
  return t.has_value() ? activation_of(op, name, *t, input) : at::Tensor();
}

// A per-channel vector for `input`: C floating-point values on its device, returned contiguous in its accumulation
// dtype (the kernels dereference it on that device).
inline at::Tensor channel_param_of(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input) {
  const int64_t channels = input.size(1);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, "fused_resnet::", op, ": expected ", name,
              " to be a vector of ", channels, " per-channel values, got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "fused_resnet::", op, ": expected ", name,
              " to be floating-point, got ", t.scalar_type());
  check_same_device(op, name, t, input);
  return t.to(accumulation_dtype(input)).contiguous();
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
  TORCH_CHECK(residual.has_value(), "fused_resnet::", op,
              ": residual_stride and residual_channel_offset need a residual");
  TORCH_CHECK(!affine, "fused_resnet::", op, ": a subsampled or channel-padded residual takes no residual_scale");
  const at::Tensor& r = *residual;
  check_activation(op, "residual", r);
  TORCH_CHECK(stride >= 1, "fused_resnet::", op, ": expected residual_stride >= 1, got ", stride);
  TORCH_CHECK(offset >= 0 && offset + r.size(1) <= input.size(1), "fused_resnet::", op, ": a residual of ",
              r.size(1), " channels at residual_channel_offset ", offset, " does not fit the input's ", input.size(1),
              " channels");
  TORCH_CHECK(r.size(0) == input.size(0) && (r.size(2) - 1) / stride + 1 == input.size(2) &&
                  (r.size(3) - 1) / stride + 1 == input.size(3),
              "fused_resnet::", op, ": a residual of shape ", r.sizes(), " subsampled by ", stride,
              " does not match the input of shape ", input.sizes());
  check_same_dtype(op, "residual", r, input);
  check_same_device(op, "residual", r, input);
  return true;
}

// bn_act's arguments, checked. `residual` is option A's when `padded` (read subsampled and channel-offset by the
// kernels, no residual_mean/residual_scale/residual_shift then), else an identity residual shaped like `input`, or
// undefined. An absent mean (residual_mean, with residual_scale) is a vector of zeros here, so that the kernels have
// one form: a call without one (the inference fallback, where BN is folded) allocates C values.
struct BnActInputs {
  at::Tensor input, mean, scale, shift, residual, residual_mean, residual_scale, residual_shift;
  bool padded = false;
};

// A per-channel mean, or zeros in the accumulation dtype when absent.
inline at::Tensor channel_mean_or_zeros(const char* op, const char* name, const std::optional<at::Tensor>& mean,
                                        const at::Tensor& input) {
  return mean.has_value() ? channel_param_of(op, name, *mean, input)
                          : at::zeros({input.size(1)}, input.options().dtype(accumulation_dtype(input)));
}

inline BnActInputs bn_act_inputs(const at::Tensor& input, const std::optional<at::Tensor>& mean,
                                 const at::Tensor& scale, const at::Tensor& shift,
                                 const std::optional<at::Tensor>& residual,
                                 const std::optional<at::Tensor>& residual_mean,
                                 const std::optional<at::Tensor>& residual_scale,
                                 const std::optional<at::Tensor>& residual_shift, int64_t residual_stride,
                                 int64_t residual_channel_offset) {
  constexpr const char* op = "bn_act";
  BnActInputs in;
  in.input = dense_input(op, input);
  TORCH_CHECK(residual_scale.has_value() == residual_shift.has_value(), "fused_resnet::", op,
              ": residual_scale and residual_shift must be given together");
  TORCH_CHECK(!residual_scale.has_value() || residual.has_value(), "fused_resnet::", op,
              ": residual_scale given without a residual");
  TORCH_CHECK(!residual_mean.has_value() || residual_scale.has_value(), "fused_resnet::", op,
              ": residual_mean given without residual_scale and residual_shift");
  in.padded = check_padded_residual(op, in.input, residual, residual_scale.has_value(), residual_stride,
                                    residual_channel_offset);
  in.residual = in.padded ? residual->contiguous(memory_format_of(in.input))
                          : optional_activation(op, "residual", residual, in.input);
  in.mean = channel_mean_or_zeros(op, "mean", mean, in.input);
  in.scale = channel_param_of(op, "scale", scale, in.input);
  in.shift = channel_param_of(op, "shift", shift, in.input);
  if (residual_scale.has_value()) {
    in.residual_mean = channel_mean_or_zeros(op, "residual_mean", residual_mean, in.input);
    in.residual_scale = channel_param_of(op, "residual_scale", *residual_scale, in.input);
    in.residual_shift = channel_param_of(op, "residual_shift", *residual_shift, in.input);
  }
  return in;
}

// bn_act_backward_reduce's arguments, checked; input2 and mean2 are both defined or both undefined. The ReLU mask
// comes from `output`, or from (input - mean) * mask_scale + mask_shift (both defined), or is absent (all three
// undefined); never from both.
struct BackwardReduceInputs {
  at::Tensor grad_output, output, input, mean, input2, mean2, mask_scale, mask_shift;
};

// The backward ops' choice of ReLU mask: output, or mask_scale with mask_shift, or neither.
inline void check_mask_source(const char* op, const std::optional<at::Tensor>& output,
                              const std::optional<at::Tensor>& mask_scale,
                              const std::optional<at::Tensor>& mask_shift) {
  TORCH_CHECK(mask_scale.has_value() == mask_shift.has_value(), "fused_resnet::", op,
              ": mask_scale and mask_shift must be given together");
  TORCH_CHECK(!(mask_scale.has_value() && output.has_value()), "fused_resnet::", op,
              ": output and mask_scale/mask_shift are exclusive (the ReLU mask comes from one or the other)");
}

// What follows `input` in both backward ops' checks, once the op has checked which optional arguments go together.
inline BackwardReduceInputs backward_activations_and_means(const char* op, const at::Tensor& grad_output,
                                                           const std::optional<at::Tensor>& output,
                                                           const at::Tensor& dense_input, const at::Tensor& mean,
                                                           const std::optional<at::Tensor>& input2,
                                                           const std::optional<at::Tensor>& mean2,
                                                           const std::optional<at::Tensor>& mask_scale,
                                                           const std::optional<at::Tensor>& mask_shift) {
  BackwardReduceInputs in;
  in.input = dense_input;
  in.input2 = optional_activation(op, "input2", input2, in.input);
  in.grad_output = activation_of(op, "grad_output", grad_output, in.input);
  in.output = optional_activation(op, "output", output, in.input);
  in.mean = channel_param_of(op, "mean", mean, in.input);
  in.mean2 = optional_channel_param(op, "mean2", mean2, in.input);
  in.mask_scale = optional_channel_param(op, "mask_scale", mask_scale, in.input);
  in.mask_shift = optional_channel_param(op, "mask_shift", mask_shift, in.input);
  return in;
}

inline BackwardReduceInputs bn_act_backward_reduce_inputs(const at::Tensor& grad_output,
                                                          const std::optional<at::Tensor>& output,
                                                          const at::Tensor& input, const at::Tensor& mean,
                                                          const std::optional<at::Tensor>& input2,
                                                          const std::optional<at::Tensor>& mean2,
                                                          const std::optional<at::Tensor>& mask_scale,
                                                          const std::optional<at::Tensor>& mask_shift) {
  constexpr const char* op = "bn_act_backward_reduce";
  const at::Tensor dense = dense_input(op, input);
  TORCH_CHECK(input2.has_value() == mean2.has_value(), "fused_resnet::", op,
              ": input2 and mean2 must be given together");
  check_mask_source(op, output, mask_scale, mask_shift);
  return backward_activations_and_means(op, grad_output, output, dense, mean, input2, mean2, mask_scale, mask_shift);
}

// bn_act_backward_elemt's arguments, checked: bn_act_backward_reduce's and the coefficients. input2, mean2 and the
// coef2_* vectors are all defined or all undefined, and not defined with residual_grad. has_grad_other: the call
// has a second output (input2's gradient, or with residual_grad the residual's).
struct BackwardElemtInputs : BackwardReduceInputs {
  at::Tensor coef_dy, coef_xmu, coef_const, coef2_dy, coef2_xmu, coef2_const;
  bool residual_grad = false, has_grad_other = false;
};

inline BackwardElemtInputs bn_act_backward_elemt_inputs(
    const at::Tensor& grad_output, const std::optional<at::Tensor>& output, const at::Tensor& input,
    const at::Tensor& mean, const at::Tensor& coef_dy, const at::Tensor& coef_xmu, const at::Tensor& coef_const,
    const std::optional<at::Tensor>& input2, const std::optional<at::Tensor>& mean2,
    const std::optional<at::Tensor>& coef2_dy, const std::optional<at::Tensor>& coef2_xmu,
    const std::optional<at::Tensor>& coef2_const, bool residual_grad, const std::optional<at::Tensor>& mask_scale,
    const std::optional<at::Tensor>& mask_shift) {
  constexpr const char* op = "bn_act_backward_elemt";
  const at::Tensor dense = dense_input(op, input);
  const bool second = input2.has_value();
  TORCH_CHECK(second == mean2.has_value() && second == coef2_dy.has_value() && second == coef2_xmu.has_value() &&
                  second == coef2_const.has_value(),
              "fused_resnet::", op, ": input2, mean2 and the coef2_* tensors must be given together");
  TORCH_CHECK(!(second && residual_grad), "fused_resnet::", op,
              ": residual_grad and input2 are exclusive (the second output is one or the other)");
  check_mask_source(op, output, mask_scale, mask_shift);
  BackwardElemtInputs in{
      backward_activations_and_means(op, grad_output, output, dense, mean, input2, mean2, mask_scale, mask_shift)};
  in.coef_dy = channel_param_of(op, "coef_dy", coef_dy, in.input);
  in.coef_xmu = channel_param_of(op, "coef_xmu", coef_xmu, in.input);
  in.coef_const = channel_param_of(op, "coef_const", coef_const, in.input);
  in.coef2_dy = optional_channel_param(op, "coef2_dy", coef2_dy, in.input);
  in.coef2_xmu = optional_channel_param(op, "coef2_xmu", coef2_xmu, in.input);
  in.coef2_const = optional_channel_param(op, "coef2_const", coef2_const, in.input);
  in.residual_grad = residual_grad;
  in.has_grad_other = second || residual_grad;
  return in;
}

}  // namespace fused_resnet
