// The CPU kernel table: one per CPU capability; Python installs the one matching ATen's choice for this CPU.
// Every tensor handed to a kernel is already checked and dense in the layout of `input` (NCHW or channels_last);
// per-channel vectors are contiguous in the accumulation dtype (fp32 for fp16/bf16/fp32, fp64 for fp64);
// sums and statistics are merged in fp64 and written in the accumulation dtype. An undefined tensor means "absent".
#pragma once

#include <ATen/core/Tensor.h>

namespace fused_resnet {

struct CpuKernels {
  void (*batch_stats)(const at::Tensor& input, at::Tensor& mean, at::Tensor& var);
  // out = [relu]((input - mean) * scale + shift + R), R = (residual - residual_mean) * residual_scale +
  // residual_shift (residual_scale defined), residual (defined), or nothing.
  void (*bn_act)(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& scale, const at::Tensor& shift,
                 const at::Tensor& residual, const at::Tensor& residual_mean, const at::Tensor& residual_scale,
                 const at::Tensor& residual_shift, bool relu, at::Tensor& out);
  // bn_act with an option A residual: residual[n, c - channel_offset, h * stride, w * stride] where it has
  // channel c - channel_offset, zero elsewhere; `residual` is dense in the layout of `input`.
  void (*bn_act_padded)(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& scale,
                        const at::Tensor& shift, const at::Tensor& residual, int64_t stride, int64_t channel_offset,
                        bool relu, at::Tensor& out);
  // The backward kernels' ReLU mask: from `output` (defined), from (input - mean) * mask_scale + mask_shift with
  // bn_act's arithmetic (mask_scale defined), or none.
  void (*backward_reduce)(const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& input,
                          const at::Tensor& mean, const at::Tensor& input2, const at::Tensor& mean2,
                          const at::Tensor& mask_scale, const at::Tensor& mask_shift, at::Tensor& sum_dy,
                          at::Tensor& sum_dy_xmu, at::Tensor& sum_dy_xmu2);
  void (*backward_elemt)(const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& input,
                         const at::Tensor& mean, const at::Tensor& coef_dy, const at::Tensor& coef_xmu,
                         const at::Tensor& coef_const, const at::Tensor& input2, const at::Tensor& mean2,
                         const at::Tensor& coef2_dy, const at::Tensor& coef2_xmu, const at::Tensor& coef2_const,
                         bool residual_grad, const at::Tensor& mask_scale, const at::Tensor& mask_shift,
                         at::Tensor& grad_input, at::Tensor& grad_other);
  // winograd_conv3x3's transforms (winograd_impl.h), float32, channels_last: u = the filters' (3 x 3 x C x K in,
  // 36 x C x K out), v = the input's (36 x tiles x C), and out = [relu](the output transform of m (36 x tiles x K)
  // + bias [+ residual]).
  void (*winograd_weight_transform)(const at::Tensor& filters, at::Tensor& u);
  void (*winograd_input_transform)(const at::Tensor& input, at::Tensor& v);
  void (*winograd_output_transform)(const at::Tensor& m, const at::Tensor& bias, const at::Tensor& residual,
                                    bool relu, at::Tensor& out);
  // winograd_conv3x3_weight_grad's: z = the output gradient's (36 x tiles x K), and grad_filters (3 x 3 x C x K) from
  // the GEMMs' du (36 x C x K).
  void (*winograd_grad_output_transform)(const at::Tensor& grad, at::Tensor& z);
  void (*winograd_weight_grad_transform)(const at::Tensor& du, at::Tensor& grad_filters);
};

// Winograd's F(4x4, 3x3) (winograd_impl.h): output tiles of 4x4 pixels, each from a 6x6 input window, and one GEMM
// per position of that window (36). An image of H x W pixels takes ceil(H/4) x ceil(W/4) tiles.
constexpr int64_t kWinogradTile = 4;
constexpr int64_t kWinogradPoints = 36;
inline int64_t winograd_tiles(int64_t images, int64_t height, int64_t width) {
  return images * ((height + kWinogradTile - 1) / kWinogradTile) * ((width + kWinogradTile - 1) / kWinogradTile);
}

const CpuKernels& cpu_kernels_default();
const CpuKernels& cpu_kernels_avx2();  // in the fused_resnet._C_avx2 module (x86-64 only)

// The table the CPU ops use: the default one until use_cpu_kernels() installs another.
const CpuKernels& cpu_kernels();
void use_cpu_kernels(const CpuKernels* table);

}  // namespace fused_resnet
