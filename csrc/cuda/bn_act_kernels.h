// Launchers of the CUDA kernels of the fused_resnet ops, on raw device pointers (bn_act_kernels.cu), so that the
// kernels compile without torch headers. Argument checks, allocation and dtype dispatch live in bn_act_cuda.cpp.
//
// Every activation is dense in one of two layouts, given by Shape::channels_last:
//   NCHW (contiguous):     N*C "planes" of HW elements, one channel per plane;
//   NHWC (channels_last):  N*HW "rows" of C elements, one channel per element of a row.
// Activations are of `dtype`; per-channel vectors (scale, mean, coefficients, ...) and the statistics and sums the
// reductions write are contiguous in the accumulation type: float for float/half/bfloat16, double for double.
// A null pointer means "absent". Launchers enqueue on `stream` and return the first CUDA error (cudaSuccess when
// every launch went in); the caller raises it. Those that take `device` run on that device, which must be current,
// with grids sized from each kernel's occupancy on it, asked of the runtime once per kernel and device.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace fused_resnet {
namespace cuda {

enum class DType { kFloat, kHalf, kBFloat16, kDouble };

// Device indices the launchers take: 0 .. kMaxDevices - 1 (torch's c10::DeviceIndex is 8 bits).
constexpr int kMaxDevices = 128;

// The fewest blocks of any kernel here that one multiprocessor of sm_80/sm_90 holds at once (registers x block size
// and shared memory allow it; no kernel spills). Not an assumption of the launchers, which size each grid from the
// kernel's real occupancy, but the floor below which a kernel needs redesigning, not a bigger grid: 2 blocks of 256
// threads (16 of 64 warps) is where the second-BN backward kernel on 16-bit NHWC rows stands (95 registers: its 64
// per-channel values stay in registers), the others reach 3 to 8. tests/test_build.py reads it and checks every
// compiled kernel against it.
constexpr int kMinBlocksPerMultiprocessor = 2;

struct Shape {
  int64_t N, C, HW;
  bool channels_last;
};

// batch_stats: per-channel mean and biased variance. `workspace`: device memory of
// batch_stats_workspace_bytes(dtype, shape) bytes, aligned for the accumulation type.
size_t batch_stats_workspace_bytes(DType dtype, const Shape& shape);
cudaError_t batch_stats(DType dtype, const Shape& shape, const void* input, void* mean, void* var, void* workspace,
                        cudaStream_t stream);

// bn_act: out = [relu]((input - mean) * scale + shift + R), R = (residual - residual_mean) * residual_scale +
// residual_shift (all three given), residual (none given) or 0 (no residual).
struct BnActArgs {
  const void* input;
  const void* mean;
  const void* scale;
  const void* shift;
  const void* residual;
  const void* residual_mean;
  const void* residual_scale;
  const void* residual_shift;
  bool relu;
  void* out;
};
cudaError_t bn_act(DType dtype, const Shape& shape, const BnActArgs& args, int device, cudaStream_t stream);

// bn_act with option A's residual (args.residual_mean, residual_scale and residual_shift unused): R[n, c, h, w] =
// residual[n, c - offset, h * stride, w * stride] where the residual has channel c - offset, 0 elsewhere. The
// residual (C x H x W per image) is dense in the layout of the input, whose height and width are H and W.
struct PaddedResidual {
  int64_t C, H, W;
  int64_t stride, offset;
};
cudaError_t bn_act_padded(DType dtype, const Shape& shape, int64_t H, int64_t W, const BnActArgs& args,
                          const PaddedResidual& residual, int device, cudaStream_t stream);

// bn_act_backward_reduce: with gm = grad_output, zeroed where output <= 0 when output is given, or where
// (input - mean) * mask_scale + mask_shift <= 0 (bn_act's arithmetic: its output's mask bit for bit) when
// mask_scale and mask_shift are given (never both sources): sum_dy = sum gm, sum_dy_xmu = sum gm * (input - mean),
// sum_dy_xmu2 = sum gm * (input2 - mean2) when input2 is given. `workspace`:
// backward_reduce_workspace_bytes(dtype, shape, input2 given) bytes, aligned as above.
struct ReduceArgs {
  const void* grad_output;
  const void* output;
  const void* input;
  const void* mean;
  const void* input2;
  const void* mean2;
  const void* mask_scale;
  const void* mask_shift;
  void* sum_dy;
  void* sum_dy_xmu;
  void* sum_dy_xmu2;
};
size_t backward_reduce_workspace_bytes(DType dtype, const Shape& shape, bool second);
cudaError_t backward_reduce(DType dtype, const Shape& shape, const ReduceArgs& args, void* workspace,
                            cudaStream_t stream);

// bn_act_backward_elemt: with gm as above,
//   grad_input = coef_dy * gm + coef_xmu * (input - mean) + coef_const;
//   grad_other = the same for (input2, mean2, coef2_*) when input2 is given, else gm when residual_grad, else
//   nothing (grad_other may then be null).
struct ElemtArgs {
  const void* grad_output;
  const void* output;
  const void* input;
  const void* mean;
  const void* coef_dy;
  const void* coef_xmu;
  const void* coef_const;
  const void* input2;
  const void* mean2;
  const void* coef2_dy;
  const void* coef2_xmu;
  const void* coef2_const;
  bool residual_grad;
  const void* mask_scale;
  const void* mask_shift;
  void* grad_input;
  void* grad_other;
};
cudaError_t backward_elemt(DType dtype, const Shape& shape, const ElemtArgs& args, int device,
                           cudaStream_t stream);

}  // namespace cuda
}  // namespace fused_resnet
