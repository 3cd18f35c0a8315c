// CUDA kernels of the fused BatchNorm(+residual)+ReLU ops and their launchers (declared in bn_act_kernels.h).
// Only CUDA headers here: the torch headers would dominate nvcc's time; bn_act_cuda.cpp is the torch glue.
//
// Arithmetic is in the accumulation type A: float for float/half/bfloat16 activations, double for double.
//
// Elementwise kernels (bn_act, backward_elemt) run grid-stride loops over "units": 16-byte vectors of V elements
// when every pointer is 16-byte aligned and the contiguous extent (C for NHWC rows, HW for NCHW planes) is a
// multiple of V, so that no vector straddles two rows or planes; single elements (V = 1) otherwise. The grid is
// one wave: as many blocks as the device holds at once, from the kernel's real occupancy (its registers decide it:
// from 2 to 8 blocks per multiprocessor), and it changes no result, since every unit is computed the same way
// whichever thread takes it. On NHWC rows the grid-stride step is a multiple of the units per row,
// so a thread stays on the same V channels and loads their parameters once; on NCHW planes a cursor follows the
// channel without dividing.
//
// Reductions (batch_stats, backward_reduce) are deterministic and use no atomics: each block reduces a fixed piece
// of the tensor (a chunk) to per-channel partials in a workspace, and a second kernel merges each channel's
// partials in a fixed order, in double. The pieces depend on the shape and dtype alone (not on the device or the
// pointers' alignment), so a call gives the same bits every time on any GPU:
//   NCHW: a block reduces one channel over a chunk of whole planes, or over one segment of a plane when there are
//         few large planes; its threads walk the chunk's (plane, position) pairs in order, so consecutive threads
//         read consecutive addresses.
//   NHWC: a block reduces a tile of rows x a slice of channels: threadIdx.x runs along the channels (coalesced
//         loads of consecutive vectors of a row), threadIdx.y along the rows; each thread keeps one column.
// Statistics use Welford's update per element and Chan et al.'s merge for partial results (count, mean, M2):
// no sum of squares, so a channel with a large mean and a small spread keeps its variance. They accumulate the
// deviations from a pivot, a value of the channel, so that the running means (in fp32 for fp32/fp16/bf16) need
// only resolve the spread, not the mean; the pivot is added back in double at the end.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "bn_act_kernels.h"

namespace fused_resnet {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------------------------
// Element types: accumulation type, conversions, 16-byte vector loads and stores.

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccOf<T>::type;

// Elements per 16-byte vector.
template <typename T>
constexpr int kVecWidth = 16 / sizeof(T);

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round to nearest even, as the CPU kernels' conversions do.
template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ double from_acc<double>(double v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// V elements loaded or stored as one access: 16 bytes (a single 128-bit instruction) when V = kVecWidth<T>.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <int V, typename T>
__device__ __forceinline__ void load(const T* p, acc_t<T> (&out)[V]) {
  const Pack<T, V> pack = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int k = 0; k < V; ++k) out[k] = to_acc(pack.v[k]);
}

template <int V, typename T>
__device__ __forceinline__ void store(T* p, const acc_t<T> (&in)[V]) {
  Pack<T, V> pack;
#pragma unroll
  for (int k = 0; k < V; ++k) pack.v[k] = from_acc<T>(in[k]);
  *reinterpret_cast<Pack<T, V>*>(p) = pack;
}

__device__ __forceinline__ float fmadd(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fmadd(double a, double b, double c) { return fma(a, b, c); }

// torch.relu keeps NaN: NaN fails `v <= 0` and passes through.
template <typename A>
__device__ __forceinline__ A apply_relu(A v) {
  return v <= A(0) ? A(0) : v;
}

// torch's threshold_backward for relu: the gradient passes unless output <= 0.
template <typename A>
__device__ __forceinline__ A relu_mask(A grad, A out) {
  return out <= A(0) ? A(0) : grad;
}

// The backward kernels' mask from the input (kInputMask): relu_mask on (x - mean) * scale + shift computed as
// BnActOp computes it (one fmadd), so that it is the mask of bn_act's output bit for bit without reading it.
template <typename A>
__device__ __forceinline__ A input_relu_mask(A grad, A x, A mean, A scale, A shift) {
  return relu_mask(grad, fmadd(x - mean, scale, shift));
}

// ---------------------------------------------------------------------------------------------------------
// Host helpers.

constexpr int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
constexpr int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
constexpr int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
constexpr int64_t gcd64(int64_t a, int64_t b) { return b == 0 ? a : gcd64(b, a % b); }

constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridY = 65535;

// With HW == 1 both layouts are the same memory; the rows (NHWC) kernels read it coalesced along C, where the
// planes kernels would read one element per plane.
Shape canonical(Shape s) {
  if (s.HW == 1) s.channels_last = true;
  return s;
}

// Whether the V = kVecWidth<T> kernels apply: every pointer 16-byte aligned (absent ones are null, hence aligned)
// and the contiguous extent a multiple of V, so that every vector lies inside one row or plane.
template <typename T, int K>
bool vectorizable(const Shape& s, const void* const (&pointers)[K]) {
  if ((s.channels_last ? s.C : s.HW) % kVecWidth<T> != 0) return false;
  for (const void* p : pointers) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

template <typename T>
struct TypeTag {
  using type = T;
};

template <typename R, typename F>
R with_type(DType dtype, R unknown, F&& f) {
  switch (dtype) {
    case DType::kFloat:
      return f(TypeTag<float>{});
    case DType::kHalf:
      return f(TypeTag<__half>{});
    case DType::kBFloat16:
      return f(TypeTag<__nv_bfloat16>{});
    case DType::kDouble:
      return f(TypeTag<double>{});
  }
  return unknown;
}

// ---------------------------------------------------------------------------------------------------------
// Elementwise kernels.

// 256 threads: 8 warps, enough per block to hide latency; 8 blocks per multiprocessor then fill its 2048 thread
// slots (sm_80, sm_90) when registers allow (at most 32 per thread; the kernels take 18 to 95 on sm_90).
constexpr int kElemThreads = 256;

// The blocks of kElemThreads threads of one grid-stride kernel that a device holds at once: its multiprocessors
// times the blocks per multiprocessor the kernel's registers and shared memory allow, asked of the runtime on the
// kernel's first launch on each device and kept. More blocks would only queue behind the first wave (with a fixed
// 8 per multiprocessor, the second-BN backward kernel on 16-bit rows, which fits 2, ran 4 waves and loaded its 64
// per-channel values 4 times per thread slot). One instance per kernel.
class ResidentBlocks {
 public:
  // `kernel` on `device`, which must be the current device.
  template <typename Kernel>
  cudaError_t get(Kernel kernel, int device, int64_t& blocks) {
    if (device < 0 || device >= kMaxDevices) return cudaErrorInvalidDevice;
    blocks = per_device_[device].load(std::memory_order_relaxed);  // 0: not asked yet
    if (blocks != 0) return cudaSuccess;
    int multiprocessors = 0, per_multiprocessor = 0;
    cudaError_t err = cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device);
    if (err == cudaSuccess) {
      err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_multiprocessor, kernel, kElemThreads, 0);
    }
    if (err != cudaSuccess) return err;
    blocks = max64(1, int64_t(multiprocessors) * per_multiprocessor);
    // Threads racing here store the same value.
    per_device_[device].store(blocks, std::memory_order_relaxed);
    return cudaSuccess;
  }

 private:
  std::atomic<int64_t> per_device_[kMaxDevices] = {};
};

// Per-channel values one thread applies to one unit: the channels c0 .. c0 + V - 1 along a row, or one channel
// c0 broadcast over a plane's V elements. P vectors of parameters.
template <typename A, int P, int V>
struct ChannelValues {
  A v[P][V];

  template <bool kRows>
  __device__ __forceinline__ void load(const A* const (&params)[P], int64_t c0) {
#pragma unroll
    for (int p = 0; p < P; ++p) {
#pragma unroll
      for (int k = 0; k < V; ++k) v[p][k] = params[p][kRows ? c0 + k : c0];
    }
  }
};

// Follows c = (i / plane_units) % C while i advances by a fixed step, with additions instead of 64-bit divisions.
struct PlaneCursor {
  int64_t r, c;            // i % plane_units, (i / plane_units) % C
  int64_t step_r, step_c;  // step % plane_units, (step / plane_units) % C
  int64_t plane_units, C;

  __device__ PlaneCursor(int64_t i, int64_t step, int64_t plane_units_, int64_t C_)
      : r(i % plane_units_),
        c((i / plane_units_) % C_),
        step_r(step % plane_units_),
        step_c((step / plane_units_) % C_),
        plane_units(plane_units_),
        C(C_) {}

  __device__ __forceinline__ void advance() {
    r += step_r;
    c += step_c;
    if (r >= plane_units) {
      r -= plane_units;
      ++c;
    }
    if (c >= C) c -= C;  // c <= (C - 1) + (C - 1) + 1 here
  }
};

// Op: a functor with `A`, `kParams`, `param` (the per-channel vectors) and operator()(unit, ChannelValues).
// Rows: the step is a multiple of row_units (see elementwise_blocks), so i % row_units is fixed per thread.
template <typename Op, int V>
__global__ void __launch_bounds__(kElemThreads) rows_elementwise_kernel(const Op op, int64_t units, int64_t row_units) {
  int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= units) return;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  ChannelValues<typename Op::A, Op::kParams, V> ch;
  ch.template load<true>(op.param, (i % row_units) * V);
  for (; i < units; i += step) op(i, ch);
}

template <typename Op, int V>
__global__ void __launch_bounds__(kElemThreads)
    planes_elementwise_kernel(const Op op, int64_t units, int64_t plane_units, int64_t C) {
  int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  PlaneCursor cursor(i, step, plane_units, C);
  ChannelValues<typename Op::A, Op::kParams, V> ch;
  for (; i < units; i += step) {
    ch.template load<false>(op.param, cursor.c);
    op(i, ch);
    cursor.advance();
  }
}

// Blocks for an elementwise grid: enough to fill the device (`resident`, see ResidentBlocks), no more than the
// units need, and for rows a multiple of row_units / gcd(row_units, kElemThreads), which makes the grid-stride step
// a multiple of row_units.
int64_t elementwise_blocks(int64_t units, int64_t resident, int64_t row_units) {
  const int64_t wanted = min64(ceil_div(units, kElemThreads), resident);
  const int64_t quantum = row_units / gcd64(row_units, kElemThreads);
  return quantum * max64(1, wanted / quantum);
}

template <int V, typename Op>
cudaError_t launch_elementwise(const Op& op, const Shape& s, int device, cudaStream_t stream) {
  const int64_t units = s.N * s.C * s.HW / V;
  int64_t resident = 0;
  if (s.channels_last) {
    static ResidentBlocks rows_resident;
    const auto kernel = rows_elementwise_kernel<Op, V>;
    if (const cudaError_t err = rows_resident.get(kernel, device, resident); err != cudaSuccess) return err;
    const int64_t row_units = s.C / V;
    const int64_t blocks = elementwise_blocks(units, resident, row_units);
    if (blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
    kernel<<<unsigned(blocks), kElemThreads, 0, stream>>>(op, units, row_units);
  } else {
    static ResidentBlocks planes_resident;
    const auto kernel = planes_elementwise_kernel<Op, V>;
    if (const cudaError_t err = planes_resident.get(kernel, device, resident); err != cudaSuccess) return err;
    const int64_t blocks = elementwise_blocks(units, resident, 1);
    kernel<<<unsigned(blocks), kElemThreads, 0, stream>>>(op, units, s.HW / V, s.C);
  }
  return cudaGetLastError();
}

// bn_act: out = [relu]((x - mean) * scale + shift + R), the centered form: with the mean folded into the shift, a
// large mean would cancel against it (docs/design.md §4).
enum class Residual { kNone, kIdentity, kAffine };  // R = 0; residual; (residual - mean2) * scale2 + shift2

template <typename T, int V, Residual kResidual>
struct BnActOp {
  using A = acc_t<T>;
  // mean, scale, shift[, residual_mean, residual_scale, residual_shift]
  static constexpr int kParams = kResidual == Residual::kAffine ? 6 : 3;
  const T* x;
  const T* res;
  T* out;
  const A* param[kParams];
  bool relu;

  __device__ __forceinline__ void operator()(int64_t i, const ChannelValues<A, kParams, V>& ch) const {
    const int64_t off = i * V;
    A v[V];
    load<V>(x + off, v);
    A r[V];
    if constexpr (kResidual != Residual::kNone) load<V>(res + off, r);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      A y = fmadd(v[k] - ch.v[0][k], ch.v[1][k], ch.v[2][k]);
      if constexpr (kResidual == Residual::kIdentity) y += r[k];
      if constexpr (kResidual == Residual::kAffine) y += fmadd(r[k] - ch.v[3][k], ch.v[4][k], ch.v[5][k]);
      v[k] = relu ? apply_relu(y) : y;
    }
    store<V>(out + off, v);
  }
};

template <typename T, Residual kResidual, int V>
cudaError_t bn_act_launch(const Shape& s, const BnActArgs& a, int device, cudaStream_t stream) {
  using Op = BnActOp<T, V, kResidual>;
  using A = acc_t<T>;
  Op op;
  op.x = static_cast<const T*>(a.input);
  op.res = static_cast<const T*>(a.residual);
  op.out = static_cast<T*>(a.out);
  op.param[0] = static_cast<const A*>(a.mean);
  op.param[1] = static_cast<const A*>(a.scale);
  op.param[2] = static_cast<const A*>(a.shift);
  if constexpr (kResidual == Residual::kAffine) {
    op.param[3] = static_cast<const A*>(a.residual_mean);
    op.param[4] = static_cast<const A*>(a.residual_scale);
    op.param[5] = static_cast<const A*>(a.residual_shift);
  }
  op.relu = a.relu;
  return launch_elementwise<V>(op, s, device, stream);
}

template <typename T, Residual kResidual>
cudaError_t bn_act_typed(const Shape& s, const BnActArgs& a, int device, cudaStream_t stream) {
  const void* const pointers[] = {a.input, a.residual, a.out};
  return vectorizable<T>(s, pointers) ? bn_act_launch<T, kResidual, kVecWidth<T>>(s, a, device, stream)
                                      : bn_act_launch<T, kResidual, 1>(s, a, device, stream);
}

// bn_act with option A's residual, one element per thread and iteration: the residual is read at computed
// coordinates (subsampled, offset in channels), so there is no vector path. Option A serves the CIFAR ResNets,
// whose tensors are small; the decomposition of each index costs divisions, not memory traffic.
template <typename T>
__global__ void __launch_bounds__(kElemThreads)
    bn_act_padded_kernel(const T* x, const acc_t<T>* mean, const acc_t<T>* scale, const acc_t<T>* shift, const T* res,
                         T* out, int64_t N, int64_t C, int64_t H, int64_t W, PaddedResidual r, bool channels_last,
                         bool relu) {
  using A = acc_t<T>;
  const int64_t total = N * C * H * W;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    int64_t n, c, h, w, rest;
    if (channels_last) {
      c = i % C;
      rest = i / C;
      w = rest % W;
      rest /= W;
      h = rest % H;
      n = rest / H;
    } else {
      w = i % W;
      rest = i / W;
      h = rest % H;
      rest /= H;
      c = rest % C;
      n = rest / C;
    }
    A v = fmadd(to_acc(x[i]) - mean[c], scale[c], shift[c]);
    const int64_t cr = c - r.offset;
    if (cr >= 0 && cr < r.C) {
      const int64_t hr = h * r.stride, wr = w * r.stride;
      const int64_t j = channels_last ? ((n * r.H + hr) * r.W + wr) * r.C + cr : ((n * r.C + cr) * r.H + hr) * r.W + wr;
      v += to_acc(res[j]);
    }
    out[i] = from_acc<T>(relu ? apply_relu(v) : v);
  }
}

template <typename T>
cudaError_t bn_act_padded_typed(const Shape& s, int64_t H, int64_t W, const BnActArgs& a, const PaddedResidual& r,
                                int device, cudaStream_t stream) {
  static ResidentBlocks padded_resident;
  const auto kernel = bn_act_padded_kernel<T>;
  int64_t resident = 0;
  if (const cudaError_t err = padded_resident.get(kernel, device, resident); err != cudaSuccess) return err;
  const int64_t blocks = max64(1, min64(ceil_div(s.N * s.C * H * W, kElemThreads), resident));
  kernel<<<unsigned(blocks), kElemThreads, 0, stream>>>(
      static_cast<const T*>(a.input), static_cast<const acc_t<T>*>(a.mean), static_cast<const acc_t<T>*>(a.scale),
      static_cast<const acc_t<T>*>(a.shift), static_cast<const T*>(a.residual), static_cast<T*>(a.out), s.N, s.C, H,
      W, r, s.channels_last, a.relu);
  return cudaGetLastError();
}

// backward_elemt: grad_input = coef_dy * gm + coef_xmu * (x - mean) + coef_const, and grad_other.
enum class Other { kNone, kMaskedGrad, kSecondBN };  // no grad_other; gm; the same formula for input2

// kInputMask: gm masked by input_relu_mask (`out` null), the last two parameters being mask_scale and mask_shift.
template <typename T, int V, Other kOther, bool kInputMask>
struct ElemtOp {
  using A = acc_t<T>;
  // mean, coef_dy, coef_xmu, coef_const[, mean2, coef2_dy, coef2_xmu, coef2_const][, mask_scale, mask_shift]
  static constexpr int kParams = (kOther == Other::kSecondBN ? 8 : 4) + (kInputMask ? 2 : 0);
  const T* g;
  const T* out;  // null: no relu mask
  const T* x;
  const T* x2;
  T* grad_x;
  T* grad_other;
  const A* param[kParams];

  __device__ __forceinline__ void operator()(int64_t i, const ChannelValues<A, kParams, V>& ch) const {
    const int64_t off = i * V;
    A gm[V];
    load<V>(g + off, gm);
    if (out != nullptr) {
      A o[V];
      load<V>(out + off, o);
#pragma unroll
      for (int k = 0; k < V; ++k) gm[k] = relu_mask(gm[k], o[k]);
    }
    A v[V];
    load<V>(x + off, v);
    if constexpr (kInputMask) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        gm[k] = input_relu_mask(gm[k], v[k], ch.v[0][k], ch.v[kParams - 2][k], ch.v[kParams - 1][k]);
      }
    }
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = fmadd(ch.v[1][k], gm[k], fmadd(ch.v[2][k], v[k] - ch.v[0][k], ch.v[3][k]));
    store<V>(grad_x + off, v);
    if constexpr (kOther == Other::kMaskedGrad) store<V>(grad_other + off, gm);
    if constexpr (kOther == Other::kSecondBN) {
      load<V>(x2 + off, v);
#pragma unroll
      for (int k = 0; k < V; ++k) v[k] = fmadd(ch.v[5][k], gm[k], fmadd(ch.v[6][k], v[k] - ch.v[4][k], ch.v[7][k]));
      store<V>(grad_other + off, v);
    }
  }
};

template <typename T, Other kOther, bool kInputMask, int V>
cudaError_t backward_elemt_launch(const Shape& s, const ElemtArgs& a, int device, cudaStream_t stream) {
  using Op = ElemtOp<T, V, kOther, kInputMask>;
  using A = acc_t<T>;
  Op op;
  op.g = static_cast<const T*>(a.grad_output);
  op.out = static_cast<const T*>(a.output);
  op.x = static_cast<const T*>(a.input);
  op.x2 = static_cast<const T*>(a.input2);
  op.grad_x = static_cast<T*>(a.grad_input);
  op.grad_other = static_cast<T*>(a.grad_other);
  op.param[0] = static_cast<const A*>(a.mean);
  op.param[1] = static_cast<const A*>(a.coef_dy);
  op.param[2] = static_cast<const A*>(a.coef_xmu);
  op.param[3] = static_cast<const A*>(a.coef_const);
  if constexpr (kOther == Other::kSecondBN) {
    op.param[4] = static_cast<const A*>(a.mean2);
    op.param[5] = static_cast<const A*>(a.coef2_dy);
    op.param[6] = static_cast<const A*>(a.coef2_xmu);
    op.param[7] = static_cast<const A*>(a.coef2_const);
  }
  if constexpr (kInputMask) {
    op.param[Op::kParams - 2] = static_cast<const A*>(a.mask_scale);
    op.param[Op::kParams - 1] = static_cast<const A*>(a.mask_shift);
  }
  return launch_elementwise<V>(op, s, device, stream);
}

template <typename T, Other kOther, bool kInputMask>
cudaError_t backward_elemt_masked(const Shape& s, const ElemtArgs& a, int device, cudaStream_t stream) {
  const void* const pointers[] = {a.grad_output, a.output, a.input, a.input2, a.grad_input, a.grad_other};
  return vectorizable<T>(s, pointers)
             ? backward_elemt_launch<T, kOther, kInputMask, kVecWidth<T>>(s, a, device, stream)
             : backward_elemt_launch<T, kOther, kInputMask, 1>(s, a, device, stream);
}

// The mask from the input is a template branch (its two extra parameters stay out of the other kernels'
// registers); the one from the output a runtime test of its pointer, as before there was another.
template <typename T, Other kOther>
cudaError_t backward_elemt_typed(const Shape& s, const ElemtArgs& a, int device, cudaStream_t stream) {
  return a.mask_scale != nullptr ? backward_elemt_masked<T, kOther, true>(s, a, device, stream)
                                 : backward_elemt_masked<T, kOther, false>(s, a, device, stream);
}

// ---------------------------------------------------------------------------------------------------------
// Reductions: geometry.

// 256 threads per reduction block: 8 warps to hide load latency, and few enough that the NHWC tree over
// threadIdx.y (at most 256 states of up to 17 values, 17 KiB of shared memory) stays cheap. A multiple of 32,
// which the warp-shuffle merges of the NCHW kernels need.
constexpr int kReduceThreads = 256;
static_assert(kReduceThreads % 32 == 0, "the NCHW reductions shuffle across full warps");
constexpr int kWarpsPerReduceBlock = kReduceThreads / 32;

// Elements one reduction block aims to reduce, from the shape alone: at least 4096 (16 per thread), which
// amortizes the block's merge and its partial's write, at most 32768 (128 per thread), and in between about
// total / 1024, so that mid-sized tensors still spread over ~1024 blocks (several per multiprocessor).
int64_t block_elements(const Shape& s) { return min64(32768, max64(4096, s.N * s.C * s.HW / 1024)); }

// NCHW: the chunks of one channel's N planes. With segments == 1 a chunk is planes_per_chunk whole planes;
// otherwise (fewer planes than chunks wanted) it is one segment of one plane: chunk j covers plane j / segments,
// elements [(j % segments) * segment_len, + segment_len) clipped to HW. segment_len is then a multiple of 8, so
// every segment of a plane whose HW is a multiple of V starts on a 16-byte boundary.
struct PlanesGeometry {
  int64_t chunks, planes_per_chunk, segments, segment_len;
};

PlanesGeometry planes_geometry(const Shape& s) {
  const int64_t wanted = ceil_div(s.N * s.HW, block_elements(s));
  PlanesGeometry g;
  if (wanted <= s.N) {
    g.segments = 1;
    g.segment_len = s.HW;
    g.planes_per_chunk = ceil_div(s.N, wanted);
    g.chunks = ceil_div(s.N, g.planes_per_chunk);
  } else {
    g.segment_len = round_up(ceil_div(s.HW, ceil_div(wanted, s.N)), 8);
    g.segments = ceil_div(s.HW, g.segment_len);  // every segment non-empty
    g.planes_per_chunk = 1;
    g.chunks = s.N * g.segments;
  }
  return g;
}

// NHWC: chunks of rows_per_chunk rows. A block covers the chunk's rows for up to 32 vectors of channels (the
// threads along a row, see rows_block), i.e. block_channels channels, sized so that it reduces ~block_elements.
// Sized with the 16-byte vector width of T whatever the kernel then uses, so that it depends on the shape alone.
struct RowsGeometry {
  int64_t chunks, rows_per_chunk;
};

template <typename T>
RowsGeometry rows_geometry(const Shape& s) {
  const int64_t block_channels = min64(s.C, 32 * kVecWidth<T>);
  RowsGeometry g;
  g.rows_per_chunk = ceil_div(block_elements(s), block_channels);
  g.chunks = ceil_div(s.N * s.HW, g.rows_per_chunk);
  return g;
}

// Threads of an NHWC reduction block: x along a row's units (at most 32: one warp then reads up to 512
// consecutive bytes of a row, and with fewer units than 32 it reads consecutive rows, which are adjacent),
// y along the rows. tx * ty <= kReduceThreads, not necessarily a power of two.
dim3 rows_block(int64_t row_units) {
  const int64_t tx = min64(32, row_units);
  return dim3(unsigned(tx), unsigned(kReduceThreads / tx));
}

template <typename T>
int64_t reduce_chunks(const Shape& s) {
  return s.channels_last ? rows_geometry<T>(s).chunks : planes_geometry(s).chunks;
}

// The workspace holds consecutive arrays of C * chunks partials of type A (3 for batch_stats: counts, means,
// M2s; 2 or 3 sums for backward_reduce); partial (channel c, chunk j) of array a is at (a * C + c) * chunks + j.
template <typename T>
int64_t partials_per_array(const Shape& s) {
  return s.C * reduce_chunks<T>(s);
}

// The part of the planes of channel c that NCHW chunk j covers, in elements.
struct PlaneChunk {
  int64_t first_plane, planes, first, len;
};

__device__ __forceinline__ PlaneChunk plane_chunk(const PlanesGeometry& g, int64_t N, int64_t HW, int64_t j) {
  PlaneChunk pc;
  if (g.segments == 1) {
    pc.first_plane = j * g.planes_per_chunk;
    pc.planes = min(g.planes_per_chunk, N - pc.first_plane);
    pc.first = 0;
    pc.len = HW;
  } else {
    pc.first_plane = j / g.segments;
    pc.planes = 1;
    pc.first = (j % g.segments) * g.segment_len;
    pc.len = min(g.segment_len, HW - pc.first);
  }
  return pc;
}

// Walks the units of an NCHW chunk, `planes` runs of `len` units, thread by thread in order: the thread starts at
// flat position threadIdx.x and advances by blockDim.x, so a warp reads consecutive units of one or two planes.
struct ChunkWalk {
  int64_t p, i;      // plane within the chunk, unit within the run
  int64_t dp, di;    // blockDim.x / len, blockDim.x % len
  int64_t planes, len;

  __device__ ChunkWalk(int64_t planes_, int64_t len_)
      : p(threadIdx.x / len_), i(threadIdx.x % len_), dp(blockDim.x / len_), di(blockDim.x % len_), planes(planes_),
        len(len_) {}

  __device__ __forceinline__ bool valid() const { return p < planes; }
  __device__ __forceinline__ void advance() {
    p += dp;
    i += di;
    if (i >= len) {
      i -= len;
      ++p;
    }
  }
};

// ---------------------------------------------------------------------------------------------------------
// batch_stats.

// The value a channel's statistics are accumulated around: its first element (n = 0, h = w = 0; channel_stride
// is HW for NCHW, 1 for NHWC), or 0 when that is not finite. Deviations from a value of the channel are of the
// order of its spread, so an fp32 running mean of them is precise to ~1e-7 of the spread, where a running mean of
// the values themselves is only precise to ~1e-7 of the mean (mean 1e4, spread 1: ~1e-3 of the spread, which
// becomes ~1e-3 of the variance).
template <typename T>
__device__ __forceinline__ acc_t<T> pivot(const T* x, int64_t c, int64_t channel_stride) {
  const acc_t<T> k = to_acc(x[c * channel_stride]);
  return isfinite(k) ? k : acc_t<T>(0);
}

// Chan et al.'s merge of (nb, mean_b, m2_b) into (n, mean, m2) for V channels sharing their counts. An empty side
// (count 0) leaves the other unchanged, whatever its mean (which may be inf or NaN).
template <int V, typename A>
__device__ __forceinline__ void chan_merge(A& n, A (&mean)[V], A (&m2)[V], A nb, const A (&mean_b)[V],
                                           const A (&m2_b)[V]) {
  if (nb == A(0)) return;
  if (n == A(0)) {
    n = nb;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      mean[k] = mean_b[k];
      m2[k] = m2_b[k];
    }
    return;
  }
  const A total = n + nb;
  const A w = nb / total;  // weight of b's mean
  const A f = n * w;       // n * nb / total
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const A delta = mean_b[k] - mean[k];
    mean[k] = fmadd(delta, w, mean[k]);
    m2[k] = fmadd(delta * delta, f, m2[k] + m2_b[k]);
  }
  n = total;
}

template <typename A>
__device__ __forceinline__ void chan_merge1(A& n, A& mean, A& m2, A nb, A mean_b, A m2_b) {
  A mean_a[1] = {mean}, m2_a[1] = {m2};
  const A mean_bv[1] = {mean_b}, m2_bv[1] = {m2_b};
  chan_merge<1>(n, mean_a, m2_a, nb, mean_bv, m2_bv);
  mean = mean_a[0];
  m2 = m2_a[0];
}

// Merges the (n, mean, m2) of a full warp into lane 0, in a fixed tree.
template <typename A>
__device__ __forceinline__ void warp_merge_moments(A& n, A& mean, A& m2) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const A nb = __shfl_down_sync(0xffffffffu, n, offset);
    const A mean_b = __shfl_down_sync(0xffffffffu, mean, offset);
    const A m2_b = __shfl_down_sync(0xffffffffu, m2, offset);
    chan_merge1(n, mean, m2, nb, mean_b, m2_b);
  }
}

// NCHW: block (c, j) reduces channel c over chunk j into partial c * chunks + j.
template <typename T, int V>
__global__ void __launch_bounds__(kReduceThreads)
    batch_stats_planes_kernel(const T* __restrict__ x, int64_t N, int64_t C, int64_t HW, PlanesGeometry g,
                              acc_t<T>* __restrict__ part_n, acc_t<T>* __restrict__ part_mean,
                              acc_t<T>* __restrict__ part_m2) {
  using A = acc_t<T>;
  const int64_t c = int64_t(blockIdx.x) / g.chunks, j = int64_t(blockIdx.x) % g.chunks;
  const PlaneChunk pc = plane_chunk(g, N, HW, j);
  const T* base = x + (pc.first_plane * C + c) * HW + pc.first;
  const int64_t plane_stride = C * HW;
  const A k0 = pivot(x, c, HW);
  // Each unit (V deviations from the pivot) is reduced exactly (mean, then squared deviations, in registers) and
  // merged in: one division per unit; with V = 1 this is Welford's update.
  A n = 0, mean = 0, m2 = 0;
  for (ChunkWalk w(pc.planes, pc.len / V); w.valid(); w.advance()) {
    A v[V];
    load<V>(base + w.p * plane_stride + w.i * V, v);
    A sum = 0;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      v[k] -= k0;
      sum += v[k];
    }
    const A unit_mean = sum * (A(1) / A(V));  // V is a power of two: exact
    A unit_m2 = 0;
#pragma unroll
    for (int k = 0; k < V; ++k) unit_m2 = fmadd(v[k] - unit_mean, v[k] - unit_mean, unit_m2);
    chan_merge1(n, mean, m2, A(V), unit_mean, unit_m2);
  }
  __shared__ A sh_n[kWarpsPerReduceBlock], sh_mean[kWarpsPerReduceBlock], sh_m2[kWarpsPerReduceBlock];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  warp_merge_moments(n, mean, m2);
  if (lane == 0) {
    sh_n[warp] = n;
    sh_mean[warp] = mean;
    sh_m2[warp] = m2;
  }
  __syncthreads();
  if (warp == 0) {
    const bool has = lane < int(blockDim.x / 32);
    n = has ? sh_n[lane] : A(0);
    mean = has ? sh_mean[lane] : A(0);
    m2 = has ? sh_m2[lane] : A(0);
    warp_merge_moments(n, mean, m2);
    if (lane == 0) {
      const int64_t slot = c * g.chunks + j;
      part_n[slot] = n;
      part_mean[slot] = mean;
      part_m2[slot] = m2;
    }
  }
}

// NHWC: block (j, slice) reduces chunk j of the rows for the units (V channels each) of its slice; each thread
// keeps one unit, so its V channels share one count and one division per row. Partial of channel c: c * chunks + j.
template <typename T, int V>
__global__ void __launch_bounds__(kReduceThreads)
    batch_stats_rows_kernel(const T* __restrict__ x, int64_t rows, int64_t C, int64_t rows_per_chunk,
                            acc_t<T>* __restrict__ part_n, acc_t<T>* __restrict__ part_mean,
                            acc_t<T>* __restrict__ part_m2) {
  using A = acc_t<T>;
  const int64_t row_units = C / V;
  const int64_t u = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t j = blockIdx.x, chunks = gridDim.x;
  const int64_t row_end = min(rows, (j + 1) * rows_per_chunk);
  int count = 0;
  A mean[V] = {}, m2[V] = {};
  if (u < row_units) {
    A k0[V];
#pragma unroll
    for (int k = 0; k < V; ++k) k0[k] = pivot(x, u * V + k, 1);
    for (int64_t r = j * rows_per_chunk + threadIdx.y; r < row_end; r += blockDim.y) {
      A v[V];
      load<V>(x + r * C + u * V, v);
      ++count;
      const A inv = A(1) / A(count);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        v[k] -= k0[k];
        const A delta = v[k] - mean[k];
        mean[k] = fmadd(delta, inv, mean[k]);
        m2[k] = fmadd(delta, v[k] - mean[k], m2[k]);
      }
    }
  }
  A n = A(count);
  // Merge the blockDim.y states of each column, a tree over threadIdx.y in shared memory: at each step the rows
  // below `half` merge the row `half` above them; `half` starts at the largest power of two below blockDim.y.
  __shared__ A sh_n[kReduceThreads], sh_mean[V][kReduceThreads], sh_m2[V][kReduceThreads];
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  const int ty = blockDim.y, y = threadIdx.y;
  int half = 1;
  while (2 * half < ty) half *= 2;
  for (; half > 0; half /= 2) {
    // Rows below 2 * half hold the states left to merge: they publish them, then the lower half merges the upper.
    // The next step only writes rows below `half`, which this step does not read: one barrier per step suffices.
    if (y < 2 * half) {
      sh_n[t] = n;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        sh_mean[k][t] = mean[k];
        sh_m2[k][t] = m2[k];
      }
    }
    __syncthreads();
    if (y < half && y + half < ty) {
      const int o = t + half * blockDim.x;
      A mean_b[V], m2_b[V];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        mean_b[k] = sh_mean[k][o];
        m2_b[k] = sh_m2[k][o];
      }
      chan_merge<V>(n, mean, m2, sh_n[o], mean_b, m2_b);
    }
  }
  if (y == 0 && u < row_units) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t slot = (u * V + k) * chunks + j;
      part_n[slot] = n;
      part_mean[slot] = mean[k];
      part_m2[slot] = m2[k];
    }
  }
}

// One warp per channel: lanes merge the channel's partials j = lane, lane + 32, ... in order, in double, then a
// fixed tree merges the lanes; the mean gets its pivot back.
constexpr int kFinalizeThreads = 256;
constexpr int kChannelsPerFinalizeBlock = kFinalizeThreads / 32;

template <typename T>
__global__ void __launch_bounds__(kFinalizeThreads)
    batch_stats_finalize_kernel(const T* __restrict__ x, int64_t C, int64_t channel_stride, int64_t chunks,
                                const acc_t<T>* __restrict__ part_n, const acc_t<T>* __restrict__ part_mean,
                                const acc_t<T>* __restrict__ part_m2, acc_t<T>* __restrict__ mean_out,
                                acc_t<T>* __restrict__ var_out) {
  using A = acc_t<T>;
  const int64_t c = int64_t(blockIdx.x) * kChannelsPerFinalizeBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (c >= C) return;  // the whole warp: c is uniform across it
  double n = 0, mean = 0, m2 = 0;
  for (int64_t j = lane; j < chunks; j += 32) {
    const int64_t slot = c * chunks + j;
    chan_merge1<double>(n, mean, m2, part_n[slot], part_mean[slot], part_m2[slot]);
  }
  warp_merge_moments(n, mean, m2);
  if (lane == 0) {
    mean_out[c] = A(double(pivot(x, c, channel_stride)) + mean);
    var_out[c] = A(m2 / n);  // n >= 1: the input is not empty
  }
}

template <typename T, int V>
cudaError_t batch_stats_partials(const Shape& s, const T* x, void* workspace, cudaStream_t stream) {
  using A = acc_t<T>;
  A* part_n = static_cast<A*>(workspace);
  A* part_mean = part_n + partials_per_array<T>(s);
  A* part_m2 = part_mean + partials_per_array<T>(s);
  if (s.channels_last) {
    const RowsGeometry g = rows_geometry<T>(s);
    const dim3 block = rows_block(s.C / V);
    const int64_t slices = ceil_div(s.C / V, block.x);
    if (g.chunks > kMaxGridX || slices > kMaxGridY) return cudaErrorInvalidConfiguration;
    batch_stats_rows_kernel<T, V><<<dim3(unsigned(g.chunks), unsigned(slices)), block, 0, stream>>>(
        x, s.N * s.HW, s.C, g.rows_per_chunk, part_n, part_mean, part_m2);
  } else {
    const PlanesGeometry g = planes_geometry(s);
    if (s.C * g.chunks > kMaxGridX) return cudaErrorInvalidConfiguration;
    batch_stats_planes_kernel<T, V><<<unsigned(s.C * g.chunks), kReduceThreads, 0, stream>>>(
        x, s.N, s.C, s.HW, g, part_n, part_mean, part_m2);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t batch_stats_typed(const Shape& s, const void* input, void* mean, void* var, void* workspace,
                              cudaStream_t stream) {
  using A = acc_t<T>;
  const T* x = static_cast<const T*>(input);
  const void* const pointers[] = {input};
  const cudaError_t err = vectorizable<T>(s, pointers) ? batch_stats_partials<T, kVecWidth<T>>(s, x, workspace, stream)
                                                        : batch_stats_partials<T, 1>(s, x, workspace, stream);
  if (err != cudaSuccess) return err;
  const A* part_n = static_cast<const A*>(workspace);
  const A* part_mean = part_n + partials_per_array<T>(s);
  const A* part_m2 = part_mean + partials_per_array<T>(s);
  batch_stats_finalize_kernel<T><<<unsigned(ceil_div(s.C, kChannelsPerFinalizeBlock)), kFinalizeThreads, 0, stream>>>(
      x, s.C, s.channels_last ? 1 : s.HW, reduce_chunks<T>(s), part_n, part_mean, part_m2, static_cast<A*>(mean),
      static_cast<A*>(var));
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------------------
// backward_reduce: kSums = 2 (sum gm, sum gm * (x - mean)) or 3 (and sum gm * (x2 - mean2)).

template <typename T>
struct ReducePointers {
  const T* g;
  const T* out;  // null: no relu mask
  const T* x;
  const T* x2;
  const acc_t<T>* mean;
  const acc_t<T>* mean2;
  const acc_t<T>* mask_scale;  // with mask_shift: the mask from the input (kInputMask; out is null then)
  const acc_t<T>* mask_shift;
};

// Adds one unit's terms to sums[s][k]; mu, mu2, scale, shift: the unit's V channels' (or one channel's, broadcast)
// mean, mean2, and mask_scale and mask_shift (kInputMask; unused otherwise).
template <int kSums, bool kInputMask, int V, typename T>
__device__ __forceinline__ void add_reduce_terms(const ReducePointers<T>& p, int64_t off, const acc_t<T> (&mu)[V],
                                                 const acc_t<T> (&mu2)[V], const acc_t<T> (&scale)[V],
                                                 const acc_t<T> (&shift)[V], acc_t<T> (&sums)[kSums][V]) {
  using A = acc_t<T>;
  A gm[V];
  load<V>(p.g + off, gm);
  if (p.out != nullptr) {
    A o[V];
    load<V>(p.out + off, o);
#pragma unroll
    for (int k = 0; k < V; ++k) gm[k] = relu_mask(gm[k], o[k]);
  }
  A v[V];
  load<V>(p.x + off, v);
  if constexpr (kInputMask) {
#pragma unroll
    for (int k = 0; k < V; ++k) gm[k] = input_relu_mask(gm[k], v[k], mu[k], scale[k], shift[k]);
  }
#pragma unroll
  for (int k = 0; k < V; ++k) {
    sums[0][k] += gm[k];
    sums[1][k] = fmadd(gm[k], v[k] - mu[k], sums[1][k]);
  }
  if constexpr (kSums == 3) {
    load<V>(p.x2 + off, v);
#pragma unroll
    for (int k = 0; k < V; ++k) sums[2][k] = fmadd(gm[k], v[k] - mu2[k], sums[2][k]);
  }
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// NCHW: block (c, j) sums channel c over chunk j into partials (s * C + c) * chunks + j.
template <typename T, int V, int kSums, bool kInputMask>
__global__ void __launch_bounds__(kReduceThreads)
    backward_reduce_planes_kernel(const ReducePointers<T> p, int64_t N, int64_t C, int64_t HW, PlanesGeometry g,
                                  acc_t<T>* __restrict__ part) {
  using A = acc_t<T>;
  const int64_t c = int64_t(blockIdx.x) / g.chunks, j = int64_t(blockIdx.x) % g.chunks;
  const PlaneChunk pc = plane_chunk(g, N, HW, j);
  const int64_t base = (pc.first_plane * C + c) * HW + pc.first;
  const int64_t plane_stride = C * HW;
  A mu[V], mu2[V], scale[V], shift[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    mu[k] = p.mean[c];
    mu2[k] = kSums == 3 ? p.mean2[c] : A(0);
    scale[k] = kInputMask ? p.mask_scale[c] : A(0);
    shift[k] = kInputMask ? p.mask_shift[c] : A(0);
  }
  A sums[kSums][V] = {};
  for (ChunkWalk w(pc.planes, pc.len / V); w.valid(); w.advance()) {
    add_reduce_terms<kSums, kInputMask, V>(p, base + w.p * plane_stride + w.i * V, mu, mu2, scale, shift, sums);
  }
  __shared__ A sh[kSums][kWarpsPerReduceBlock];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int s = 0; s < kSums; ++s) {
    A total = 0;
#pragma unroll
    for (int k = 0; k < V; ++k) total += sums[s][k];
    total = warp_sum(total);
    if (lane == 0) sh[s][warp] = total;
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int s = 0; s < kSums; ++s) {
      const A total = warp_sum(lane < int(blockDim.x / 32) ? sh[s][lane] : A(0));
      if (lane == 0) part[(s * C + c) * g.chunks + j] = total;
    }
  }
}

// NHWC: block (j, slice) sums chunk j of the rows for the units of its slice, each thread one unit. The minimum of
// blocks is the floor the design asks for anyway (kMinBlocksPerMultiprocessor): without it ptxas held the 16-bit
// kernel with the mask from the input (V = 8 values each of mean, mask_scale and mask_shift live through the loop)
// to 64 registers and spilled 10 bytes on sm_90.
template <typename T, int V, int kSums, bool kInputMask>
__global__ void __launch_bounds__(kReduceThreads, kMinBlocksPerMultiprocessor)
    backward_reduce_rows_kernel(const ReducePointers<T> p, int64_t rows, int64_t C, int64_t rows_per_chunk,
                                acc_t<T>* __restrict__ part) {
  using A = acc_t<T>;
  const int64_t row_units = C / V;
  const int64_t u = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t j = blockIdx.x, chunks = gridDim.x;
  const int64_t row_end = min(rows, (j + 1) * rows_per_chunk);
  A sums[kSums][V] = {};
  if (u < row_units) {
    A mu[V], mu2[V], scale[V], shift[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      mu[k] = p.mean[u * V + k];
      mu2[k] = kSums == 3 ? p.mean2[u * V + k] : A(0);
      scale[k] = kInputMask ? p.mask_scale[u * V + k] : A(0);
      shift[k] = kInputMask ? p.mask_shift[u * V + k] : A(0);
    }
    for (int64_t r = j * rows_per_chunk + threadIdx.y; r < row_end; r += blockDim.y) {
      add_reduce_terms<kSums, kInputMask, V>(p, r * C + u * V, mu, mu2, scale, shift, sums);
    }
  }
  // Tree over threadIdx.y in shared memory, as in batch_stats_rows_kernel.
  __shared__ A sh[kSums][V][kReduceThreads];
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  const int ty = blockDim.y, y = threadIdx.y;
  int half = 1;
  while (2 * half < ty) half *= 2;
  for (; half > 0; half /= 2) {
    if (y < 2 * half) {
#pragma unroll
      for (int s = 0; s < kSums; ++s) {
#pragma unroll
        for (int k = 0; k < V; ++k) sh[s][k][t] = sums[s][k];
      }
    }
    __syncthreads();
    if (y < half && y + half < ty) {
      const int o = t + half * blockDim.x;
#pragma unroll
      for (int s = 0; s < kSums; ++s) {
#pragma unroll
        for (int k = 0; k < V; ++k) sums[s][k] += sh[s][k][o];
      }
    }
  }
  if (y == 0 && u < row_units) {
#pragma unroll
    for (int s = 0; s < kSums; ++s) {
#pragma unroll
      for (int k = 0; k < V; ++k) part[(s * C + u * V + k) * chunks + j] = sums[s][k];
    }
  }
}

// One warp per channel: lanes add the channel's partials j = lane, lane + 32, ... in order, in double, then a
// fixed tree adds the lanes.
template <typename A>
__global__ void __launch_bounds__(kFinalizeThreads)
    backward_reduce_finalize_kernel(int64_t C, int64_t chunks, int sums, const A* __restrict__ part,
                                    A* __restrict__ out0, A* __restrict__ out1, A* __restrict__ out2) {
  const int64_t c = int64_t(blockIdx.x) * kChannelsPerFinalizeBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (c >= C) return;  // the whole warp: c is uniform across it
  for (int s = 0; s < sums; ++s) {
    double total = 0;
    for (int64_t j = lane; j < chunks; j += 32) total += part[(s * C + c) * chunks + j];
    total = warp_sum(total);
    // A select, not an array of the three pointers indexed by s: that array would live in local memory.
    A* const out = s == 0 ? out0 : s == 1 ? out1 : out2;
    if (lane == 0) out[c] = A(total);
  }
}

template <typename T, int V, int kSums, bool kInputMask>
cudaError_t backward_reduce_partials(const Shape& s, const ReducePointers<T>& p, acc_t<T>* part,
                                     cudaStream_t stream) {
  if (s.channels_last) {
    const RowsGeometry g = rows_geometry<T>(s);
    const dim3 block = rows_block(s.C / V);
    const int64_t slices = ceil_div(s.C / V, block.x);
    if (g.chunks > kMaxGridX || slices > kMaxGridY) return cudaErrorInvalidConfiguration;
    backward_reduce_rows_kernel<T, V, kSums, kInputMask>
        <<<dim3(unsigned(g.chunks), unsigned(slices)), block, 0, stream>>>(p, s.N * s.HW, s.C, g.rows_per_chunk, part);
  } else {
    const PlanesGeometry g = planes_geometry(s);
    if (s.C * g.chunks > kMaxGridX) return cudaErrorInvalidConfiguration;
    backward_reduce_planes_kernel<T, V, kSums, kInputMask><<<unsigned(s.C * g.chunks), kReduceThreads, 0, stream>>>(
        p, s.N, s.C, s.HW, g, part);
  }
  return cudaGetLastError();
}

template <typename T, int kSums, bool kInputMask>
cudaError_t backward_reduce_masked(const Shape& s, const ReducePointers<T>& p, acc_t<T>* part, cudaStream_t stream) {
  const void* const pointers[] = {p.g, p.out, p.x, p.x2};
  return vectorizable<T>(s, pointers)
             ? backward_reduce_partials<T, kVecWidth<T>, kSums, kInputMask>(s, p, part, stream)
             : backward_reduce_partials<T, 1, kSums, kInputMask>(s, p, part, stream);
}

// The mask from the input is a template branch, as in backward_elemt_typed.
template <typename T, int kSums>
cudaError_t backward_reduce_sums(const Shape& s, const ReducePointers<T>& p, acc_t<T>* part, cudaStream_t stream) {
  return p.mask_scale != nullptr ? backward_reduce_masked<T, kSums, true>(s, p, part, stream)
                                 : backward_reduce_masked<T, kSums, false>(s, p, part, stream);
}

template <typename T>
cudaError_t backward_reduce_typed(const Shape& s, const ReduceArgs& a, void* workspace, cudaStream_t stream) {
  using A = acc_t<T>;
  const ReducePointers<T> p{static_cast<const T*>(a.grad_output), static_cast<const T*>(a.output),
                            static_cast<const T*>(a.input),       static_cast<const T*>(a.input2),
                            static_cast<const A*>(a.mean),        static_cast<const A*>(a.mean2),
                            static_cast<const A*>(a.mask_scale),  static_cast<const A*>(a.mask_shift)};
  A* part = static_cast<A*>(workspace);
  const int sums = p.x2 != nullptr ? 3 : 2;
  const cudaError_t err = sums == 3 ? backward_reduce_sums<T, 3>(s, p, part, stream)
                                    : backward_reduce_sums<T, 2>(s, p, part, stream);
  if (err != cudaSuccess) return err;
  backward_reduce_finalize_kernel<A>
      <<<unsigned(ceil_div(s.C, kChannelsPerFinalizeBlock)), kFinalizeThreads, 0, stream>>>(
          s.C, reduce_chunks<T>(s), sums, part, static_cast<A*>(a.sum_dy), static_cast<A*>(a.sum_dy_xmu),
          static_cast<A*>(a.sum_dy_xmu2));
  return cudaGetLastError();
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// Launchers.

size_t batch_stats_workspace_bytes(DType dtype, const Shape& shape) {
  const Shape s = canonical(shape);
  return with_type(dtype, size_t(0), [&](auto tag) {
    using T = typename decltype(tag)::type;
    return size_t(3 * partials_per_array<T>(s)) * sizeof(acc_t<T>);
  });
}

cudaError_t batch_stats(DType dtype, const Shape& shape, const void* input, void* mean, void* var, void* workspace,
                        cudaStream_t stream) {
  const Shape s = canonical(shape);
  return with_type(dtype, cudaErrorInvalidValue, [&](auto tag) {
    return batch_stats_typed<typename decltype(tag)::type>(s, input, mean, var, workspace, stream);
  });
}

cudaError_t bn_act(DType dtype, const Shape& shape, const BnActArgs& args, int device, cudaStream_t stream) {
  const Shape s = canonical(shape);
  return with_type(dtype, cudaErrorInvalidValue, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (args.residual == nullptr) return bn_act_typed<T, Residual::kNone>(s, args, device, stream);
    if (args.residual_scale == nullptr) return bn_act_typed<T, Residual::kIdentity>(s, args, device, stream);
    return bn_act_typed<T, Residual::kAffine>(s, args, device, stream);
  });
}

cudaError_t bn_act_padded(DType dtype, const Shape& shape, int64_t H, int64_t W, const BnActArgs& args,
                          const PaddedResidual& residual, int device, cudaStream_t stream) {
  return with_type(dtype, cudaErrorInvalidValue, [&](auto tag) {
    return bn_act_padded_typed<typename decltype(tag)::type>(shape, H, W, args, residual, device, stream);
  });
}

size_t backward_reduce_workspace_bytes(DType dtype, const Shape& shape, bool second) {
  const Shape s = canonical(shape);
  return with_type(dtype, size_t(0), [&](auto tag) {
    using T = typename decltype(tag)::type;
    return size_t((second ? 3 : 2) * partials_per_array<T>(s)) * sizeof(acc_t<T>);
  });
}

cudaError_t backward_reduce(DType dtype, const Shape& shape, const ReduceArgs& args, void* workspace,
                            cudaStream_t stream) {
  const Shape s = canonical(shape);
  return with_type(dtype, cudaErrorInvalidValue, [&](auto tag) {
    return backward_reduce_typed<typename decltype(tag)::type>(s, args, workspace, stream);
  });
}

cudaError_t backward_elemt(DType dtype, const Shape& shape, const ElemtArgs& args, int device,
                           cudaStream_t stream) {
  const Shape s = canonical(shape);
  return with_type(dtype, cudaErrorInvalidValue, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (args.input2 != nullptr) return backward_elemt_typed<T, Other::kSecondBN>(s, args, device, stream);
    if (args.residual_grad) return backward_elemt_typed<T, Other::kMaskedGrad>(s, args, device, stream);
    return backward_elemt_typed<T, Other::kNone>(s, args, device, stream);
  });
}

}  // namespace cuda
}  // namespace fused_resnet
