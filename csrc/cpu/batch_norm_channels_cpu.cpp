// The per-channel BatchNorm arithmetic of a training step on the CPU: the affine form in forward, the input
// gradient's coefficients in backward and the running-statistics update, each one loop over the channels in the
// accumulation dtype. The same arithmetic in ATen ops from Python (fused_resnet/kernels/base.py, the reference
// every other kernel set runs) takes 4-8 ops per step each, ~15 a BatchNorm: 300 of a resnet18 step's ATen calls.
// Each operation rounds as those ATen ops do (the lerp as ATen's vectorized CPU kernel: one fused multiply-add),
// so the results are the reference's bit for bit.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <optional>

namespace fused_resnet {
namespace {

// A 1-D floating-point vector in fp32 or fp64 (an accumulation dtype), on the CPU. The ops read their inputs
// through .contiguous(); the running statistics, written in place, must be contiguous (KernelSet's reference
// updates any others).
void check_accumulation_vector(const char* op, const char* name, const at::Tensor& t, bool written = false) {
  TORCH_CHECK(t.dim() == 1, "fused_resnet::", op, ": expected ", name, " to be 1-D (C,), got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "fused_resnet::", op, ": expected ",
              name, " in an accumulation dtype (float32 or float64), got ", t.scalar_type());
  TORCH_CHECK(!written || t.is_contiguous(), "fused_resnet::", op, ": expected ", name, " to be contiguous");
}

// `t` (C,) as the contiguous vector of `like`'s dtype the loop reads, or undefined when absent.
at::Tensor channel_operand(const char* op, const char* name, const std::optional<at::Tensor>& t,
                           const at::Tensor& like) {
  if (!t.has_value() || !t->defined()) {
    return at::Tensor();
  }
  TORCH_CHECK(t->dim() == 1 && t->size(0) == like.size(0), "fused_resnet::", op, ": expected ", name, " of shape (",
              like.size(0), ",), got ", t->sizes());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "fused_resnet::", op, ": expected ", name,
              " to be a floating-point tensor, got ", t->scalar_type());
  return t->to(like.scalar_type()).contiguous();
}

template <typename scalar_t>
const scalar_t* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_affine_cpu(const at::Tensor& var_,
                                                                     const std::optional<at::Tensor>& weight_,
                                                                     const std::optional<at::Tensor>& bias_,
                                                                     double eps) {
  check_accumulation_vector("batch_norm_affine", "var", var_);
  const at::Tensor var = var_.contiguous();
  const at::Tensor weight = channel_operand("batch_norm_affine", "weight", weight_, var);
  const at::Tensor bias = channel_operand("batch_norm_affine", "bias", bias_, var);
  at::Tensor invstd = at::empty_like(var), scale = at::empty_like(var), shift = at::empty_like(var);
  AT_DISPATCH_FLOATING_TYPES(var.scalar_type(), "batch_norm_affine", [&] {
    const scalar_t* v = var.const_data_ptr<scalar_t>();
    const scalar_t* w = data_or_null<scalar_t>(weight);
    const scalar_t* b = data_or_null<scalar_t>(bias);
    scalar_t* i_out = invstd.mutable_data_ptr<scalar_t>();
    scalar_t* s_out = scale.mutable_data_ptr<scalar_t>();
    scalar_t* b_out = shift.mutable_data_ptr<scalar_t>();
    const scalar_t e = static_cast<scalar_t>(eps);
    for (int64_t c = 0; c < var.size(0); ++c) {
      const scalar_t i = scalar_t(1) / std::sqrt(v[c] + e);
      i_out[c] = i;
      s_out[c] = w != nullptr ? i * w[c] : i;
      b_out[c] = b != nullptr ? b[c] : scalar_t(0);
    }
  });
  return {invstd, scale, shift};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_coefs_cpu(
    const at::Tensor& sum_dy_, const at::Tensor& sum_dy_xmu_, const at::Tensor& invstd_,
    const std::optional<at::Tensor>& weight_, bool use_batch_stats, double count) {
  check_accumulation_vector("batch_norm_backward_coefs", "invstd", invstd_);
  const at::Tensor sum_dy = sum_dy_.contiguous(), sum_dy_xmu = sum_dy_xmu_.contiguous();
  const at::Tensor invstd = invstd_.contiguous();
  for (const auto& [name, t] : {std::pair{"sum_dy", &sum_dy}, std::pair{"sum_dy_xmu", &sum_dy_xmu}}) {
    check_accumulation_vector("batch_norm_backward_coefs", name, *t);
    TORCH_CHECK(t->size(0) == invstd.size(0) && t->scalar_type() == invstd.scalar_type(),
                "fused_resnet::batch_norm_backward_coefs: expected ", name, " of shape (", invstd.size(0),
                ",) and dtype ", invstd.scalar_type(), ", got ", t->sizes(), " and ", t->scalar_type());
  }
  TORCH_CHECK(!use_batch_stats || count > 0, "fused_resnet::batch_norm_backward_coefs: expected a positive count, got ",
              count);
  const at::Tensor weight = channel_operand("batch_norm_backward_coefs", "weight", weight_, invstd);
  at::Tensor coef_dy = at::empty_like(invstd), coef_xmu = at::empty_like(invstd);
  at::Tensor coef_const = at::empty_like(invstd), grad_weight = at::empty_like(invstd);
  at::Tensor grad_bias = at::empty_like(invstd);
  AT_DISPATCH_FLOATING_TYPES(invstd.scalar_type(), "batch_norm_backward_coefs", [&] {
    const scalar_t* s_dy = sum_dy.const_data_ptr<scalar_t>();
    const scalar_t* s_dy_xmu = sum_dy_xmu.const_data_ptr<scalar_t>();
    const scalar_t* i = invstd.const_data_ptr<scalar_t>();
    const scalar_t* w = data_or_null<scalar_t>(weight);
    scalar_t* k_dy = coef_dy.mutable_data_ptr<scalar_t>();
    scalar_t* k_xmu = coef_xmu.mutable_data_ptr<scalar_t>();
    scalar_t* k_0 = coef_const.mutable_data_ptr<scalar_t>();
    scalar_t* g_w = grad_weight.mutable_data_ptr<scalar_t>();
    scalar_t* g_b = grad_bias.mutable_data_ptr<scalar_t>();
    // -1/count rounded once to the accumulation dtype, as the reference's 0-d operand is.
    const scalar_t minus_inv_count = use_batch_stats ? static_cast<scalar_t>(-1.0 / count) : scalar_t(0);
    for (int64_t c = 0; c < invstd.size(0); ++c) {
      const scalar_t w_invstd = w != nullptr ? i[c] * w[c] : i[c];
      const scalar_t sum_dy_xhat = s_dy_xmu[c] * i[c];
      k_dy[c] = w_invstd;
      g_w[c] = sum_dy_xhat;
      g_b[c] = s_dy[c];
      // invstd^3 on its own underflows fp32 for a spread above ~4e12: (sum * invstd) * w_invstd stays in range.
      k_xmu[c] = use_batch_stats ? sum_dy_xhat * i[c] * w_invstd * minus_inv_count : scalar_t(0);
      k_0[c] = use_batch_stats ? w_invstd * s_dy[c] * minus_inv_count : scalar_t(0);
    }
  });
  return {coef_dy, coef_xmu, coef_const, grad_weight, grad_bias};
}

// ATen's vectorized CPU lerp: start + weight * (end - start) for |weight| < 0.5, else
// end + (weight - 1) * (end - start), each one fused multiply-add.
template <typename scalar_t>
scalar_t lerp(scalar_t start, scalar_t end, scalar_t weight) {
  const bool small = std::abs(weight) < scalar_t(0.5);
  return std::fma(small ? weight : weight - scalar_t(1), end - start, small ? start : end);
}

void batch_norm_update_running_stats_cpu(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean_,
                                         const at::Tensor& var_, double factor, double count) {
  const char* op = "batch_norm_update_running_stats_";
  check_accumulation_vector(op, "mean", mean_);
  const at::Tensor mean = mean_.contiguous(), var = var_.contiguous();
  for (const auto& [name, t, written] :
       {std::tuple<const char*, const at::Tensor*, bool>{"running_mean", &running_mean, true},
        std::tuple<const char*, const at::Tensor*, bool>{"running_var", &running_var, true},
        std::tuple<const char*, const at::Tensor*, bool>{"var", &var, false}}) {
    check_accumulation_vector(op, name, *t, written);
    TORCH_CHECK(t->size(0) == mean.size(0) && t->scalar_type() == mean.scalar_type(), "fused_resnet::", op,
                ": expected ", name, " of shape (", mean.size(0), ",) and dtype ", mean.scalar_type(), ", got ",
                t->sizes(), " and ", t->scalar_type());
  }
  TORCH_CHECK(count > 1, "fused_resnet::", op, ": expected more than 1 value per channel, got count ", count);
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "batch_norm_update_running_stats_", [&] {
    const scalar_t* m = mean.const_data_ptr<scalar_t>();
    const scalar_t* v = var.const_data_ptr<scalar_t>();
    scalar_t* r_m = running_mean.mutable_data_ptr<scalar_t>();
    scalar_t* r_v = running_var.mutable_data_ptr<scalar_t>();
    const scalar_t w = static_cast<scalar_t>(factor);
    // The running variance takes the unbiased batch variance, as nn.BatchNorm2d's does.
    const scalar_t bessel = static_cast<scalar_t>(count / (count - 1));
    for (int64_t c = 0; c < mean.size(0); ++c) {
      r_m[c] = lerp(r_m[c], m[c], w);
      r_v[c] = lerp(r_v[c], v[c] * bessel, w);
    }
  });
  // An in-place ATen op bumps its outputs' version counters in its autograd layer, which an op registered for the
  // CPU alone does not pass through: done here, so that whoever watches the running statistics' versions (autograd's
  // saved-tensor checks, fused_resnet.warmup's restore) sees the update.
  running_mean.unsafeGetTensorImpl()->bump_version();
  running_var.unsafeGetTensorImpl()->bump_version();
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) {
  m.impl("batch_norm_affine", &batch_norm_affine_cpu);
  m.impl("batch_norm_backward_coefs", &batch_norm_backward_coefs_cpu);
  m.impl("batch_norm_update_running_stats_", &batch_norm_update_running_stats_cpu);
}

}  // namespace fused_resnet
