// The CPU kernels compiled for AVX2+FMA, as their own extension module (fused_resnet._C_avx2) because the
// extension build applies one set of flags to all its sources, and these need -mavx2 -mfma -mf16c with
// at::vec's AVX2 specializations (CPU_CAPABILITY=AVX2). fused_resnet loads it only where ATen itself runs AVX2
// or AVX-512 kernels, and hands the table to fused_resnet._C.
// Measured on a 2-core AMD EPYC (fp32, 16x64x56x56): 3-10x faster than the same kernels in the default build.
#include <pybind11/pybind11.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#define FUSED_RESNET_KERNEL_TABLE cpu_kernels_avx2
#include "kernels_impl.h"

PYBIND11_MODULE(_C_avx2, m) {
  m.doc() = "fused_resnet CPU kernels for AVX2 (see fused_resnet._C.use_cpu_kernels)";
  m.attr("kernels") = pybind11::capsule(&fused_resnet::cpu_kernels_avx2(), "fused_resnet.CpuKernels");
}
