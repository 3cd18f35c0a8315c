// The kernels for CPUs without AVX2 (and for any CPU when ATEN_CPU_CAPABILITY=default).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#define FUSED_RESNET_KERNEL_TABLE cpu_kernels_default
#include "kernels_impl.h"
