// Schemas of the fused_resnet ops. Implementations register per dispatch key: csrc/cpu (CPU) and csrc/cuda (CUDA).
// Per-channel statistics and coefficients are in the accumulation dtype: fp32 for fp16/bf16/fp32 inputs, fp64 for fp64.

#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <cstring>

#include "cpu/kernels.h"

TORCH_LIBRARY(fused_resnet, m) {
  // Per-channel mean and biased variance of a 4-D activation.
  m.def("batch_stats(Tensor input) -> (Tensor mean, Tensor var)");
  // [relu]((input - mean) * scale + shift + R), R = (residual - residual_mean) * residual_scale + residual_shift,
  // residual, or nothing; a None mean (residual_mean) is 0. The centered form: with shift = bias - mean * scale
  // folded in advance, a large mean cancels against the shift (at a mean of 1e4 and a spread of ~3, ~3e-4 on O(1)
  // outputs in fp32).
  // With residual_stride > 1 or residual_channel_offset > 0 (or a residual with fewer channels), R is option A's
  // shortcut: R[n, c, h, w] = residual[n, c - residual_channel_offset, h * stride, w * stride] where residual has
  // that channel, 0 elsewhere (no residual_mean or residual_scale then).
  m.def(
      "bn_act(Tensor input, Tensor? mean, Tensor scale, Tensor shift, Tensor? residual, Tensor? residual_mean, "
      "Tensor? residual_scale, Tensor? residual_shift, bool relu, int residual_stride=1, "
      "int residual_channel_offset=0) -> Tensor");
  // The backward ops' gm is grad_output masked by the ReLU, from one of (or none: gm = grad_output):
  //   output                   gm = grad_output where output > 0 (or NaN), the ReLU's saved output;
  //   mask_scale, mask_shift   gm = grad_output where (input - mean) * mask_scale + mask_shift > 0 (or NaN),
  //                            computed as bn_act computes it, so that it is output > 0 bit for bit for
  //                            output = bn_act(input, mean, mask_scale, mask_shift, relu=True) of the same kernels:
  //                            the ReLU's output need not be kept or read. (In float16/bfloat16 a positive value
  //                            that rounds to 0 in that output passes the gradient here: the exact ReLU derivative.)
  // bn_act_backward_reduce: (sum gm, sum gm * (input - mean), sum gm * (input2 - mean2) or an empty tensor).
  m.def(
      "bn_act_backward_reduce(Tensor grad_output, Tensor? output, Tensor input, Tensor mean, Tensor? input2, "
      "Tensor? mean2, Tensor? mask_scale=None, Tensor? mask_shift=None) -> (Tensor sum_dy, Tensor sum_dy_xmu, "
      "Tensor sum_dy_xmu2)");
  // grad_input = coef_dy * gm + coef_xmu * (input - mean) + coef_const; grad_other is the same for input2, or gm
  // when residual_grad (an identity residual's gradient), or an empty tensor.
  m.def(
      "bn_act_backward_elemt(Tensor grad_output, Tensor? output, Tensor input, Tensor mean, Tensor coef_dy, "
      "Tensor coef_xmu, Tensor coef_const, Tensor? input2, Tensor? mean2, Tensor? coef2_dy, Tensor? coef2_xmu, "
      "Tensor? coef2_const, bool residual_grad, Tensor? mask_scale=None, Tensor? mask_shift=None) -> "
      "(Tensor grad_input, Tensor grad_other)");
  // The per-channel arithmetic of a BatchNorm in training, on vectors in the accumulation dtype (CPU only,
  // csrc/cpu/batch_norm_channels_cpu.cpp; other kernel sets run the same arithmetic as ATen ops, the reference in
  // fused_resnet/kernels/base.py). The affine form: invstd = 1 / sqrt(var + eps), scale = invstd * weight,
  // shift = bias (weight 1 and bias 0 when absent).
  m.def(
      "batch_norm_affine(Tensor var, Tensor? weight, Tensor? bias, float eps) -> (Tensor invstd, Tensor scale, "
      "Tensor shift)");
  // bn_act_backward_elemt's coefficients from bn_act_backward_reduce's sums over `count` values per channel, and
  // the weight's and bias's gradients: coef_dy = weight * invstd; with batch statistics coef_xmu =
  // -sum_dy_xmu * invstd^2 * coef_dy / count and coef_const = -coef_dy * sum_dy / count, else both 0;
  // grad_weight = sum_dy_xmu * invstd; grad_bias = sum_dy, a tensor of its own (two BatchNorms adding into one
  // ReLU share sum_dy, and AccumulateGrad would copy a gradient given to two parameters).
  m.def(
      "batch_norm_backward_coefs(Tensor sum_dy, Tensor sum_dy_xmu, Tensor invstd, Tensor? weight, "
      "bool use_batch_stats, float count) -> (Tensor coef_dy, Tensor coef_xmu, Tensor coef_const, "
      "Tensor grad_weight, Tensor grad_bias)");
  // running += factor * (batch - running) for the mean and, with the unbiased variance var * count / (count - 1),
  // the variance: nn.BatchNorm2d's update, with running statistics in the batch statistics' dtype.
  m.def(
      "batch_norm_update_running_stats_(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var, "
      "float factor, float count) -> ()");
  // A 3x3 convolution by Winograd's F(4x4, 3x3) (CPU, float32; csrc/cpu/winograd_impl.h): [relu](conv(input,
  // weight, stride 1, padding 1) [+ bias] [+ residual]), the output channels_last, from weight_transform =
  // winograd_weight_transform(weight) (36 x C x K).
  m.def("winograd_weight_transform(Tensor weight) -> Tensor");
  m.def("winograd_conv3x3(Tensor input, Tensor weight_transform, Tensor? bias, Tensor? residual, bool relu) -> Tensor");
  // The weight gradient of that convolution (K x C x 3 x 3) from its input and output gradient, by the same
  // algorithm transposed.
  m.def("winograd_conv3x3_weight_grad(Tensor input, Tensor grad_output) -> Tensor");
  // A convolution without bias (one group; CPU, float32, float64, bfloat16 or float16; csrc/cpu/conv_gemm_cpu.cpp),
  // its input gradient and its weight gradient, each as one GEMM with the input's patches (im2col). Each activation
  // result is laid out as its first argument (channels_last or NCHW); the weight may be laid out either way. The weight
  // gradient is laid out as weight_format (default: the input's; channels_last needs a channels_last input).
  m.def("conv_gemm(Tensor input, Tensor weight, int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  m.def(
      "conv_input_grad_gemm(Tensor grad_output, Tensor weight, int[4] input_size, int[2] stride, int[2] padding, "
      "int[2] dilation) -> Tensor");
  m.def(
      "conv_weight_grad_gemm(Tensor input, Tensor grad_output, int[2] kernel_size, int[2] stride, int[2] padding, "
      "int[2] dilation, MemoryFormat? weight_format=None) -> Tensor");
}

// `import fused_resnet._C` loads this library, which registers the ops above.
PYBIND11_MODULE(_C, m) {
  m.doc() = "fused_resnet native kernels (the ops live in torch.ops.fused_resnet)";
  // FUSED_RESNET_WITH_CUDA is defined by setup.py when it compiles csrc/cuda.
#ifdef FUSED_RESNET_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
  m.def(
      "use_cpu_kernels",
      [](pybind11::object table) {
        if (table.is_none()) {
          fused_resnet::use_cpu_kernels(nullptr);
          return;
        }
        auto capsule = table.cast<pybind11::capsule>();
        TORCH_CHECK(capsule.name() != nullptr && std::strcmp(capsule.name(), "fused_resnet.CpuKernels") == 0,
                    "use_cpu_kernels: expected the `kernels` capsule of a fused_resnet CPU kernel module");
        fused_resnet::use_cpu_kernels(capsule.get_pointer<const fused_resnet::CpuKernels>());
      },
      pybind11::arg("table"),
      "Installs a CPU kernel table (a module's `kernels` capsule), or the default one for None.");
  // Asked here, in the module built for any x86-64, rather than in _C_avx2, whose code may use AVX2 anywhere.
  // __builtin_cpu_supports also requires the OS to save the AVX registers (XGETBV), which a flag list does not say.
  m.def(
      "cpu_runs_avx2_kernels",
      []() {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
        return false;
#endif
      },
      "Whether this CPU executes the instructions fused_resnet._C_avx2 is compiled for (AVX2, FMA, F16C).");
}
