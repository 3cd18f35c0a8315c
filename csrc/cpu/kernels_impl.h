// The CPU kernels of the fused BatchNorm(+residual)+ReLU ops, compiled once per CPU capability
// (kernels_default.cpp, kernels_avx2.cpp): include it after defining FUSED_RESNET_KERNEL_TABLE, the name of the
// function that returns this build's table. Argument checks, layouts and allocation live in bn_act_cpu.cpp.
//
// An activation is 4-D and dense in one of two layouts:
//   NCHW (contiguous):     N*C "planes" of H*W elements, one channel per plane;
//   NHWC (channels_last):  N*H*W "rows" of C elements, one channel per element of a row.
// Every kernel walks the tensor by those contiguous segments and vectorizes along them with at::vec;
// a per-channel parameter is a broadcast scalar inside a plane and a vector load along a row.
//
// Reductions are deterministic whatever the thread count: the tensor is cut into tiles whose bounds depend
// on the shape alone, each tile is reduced on its own, and tile results are merged in tile order. Batch
// statistics are robust to a large mean: each tile (small enough to stay in cache) is reduced in two passes
// (mean, then the corrected sum of squared deviations from it) and tiles are merged with Chan et al.'s update in
// double. With mean 1e4 and spread 1 in fp32 this keeps the variance to 1e-5; sum and sum of squares lose it all.

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "kernels.h"

namespace fused_resnet {
namespace {

using at::vec::Vectorized;

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

// Elements of a plane reduced together in one tile: 16 KiB of fp32, comfortably inside L1/L2 for the second pass
// (channels_last tiles: rows_per_tile).
constexpr int64_t kTileElements = 4096;
// Elements per parallel task in elementwise kernels (ATen's TensorIterator grain): less is not worth a thread.
constexpr int64_t kGrainElements = 32768;

struct Layout {
  int64_t N, C, H, W, HW;
  bool channels_last;
};

Layout layout_of(const at::Tensor& t) {
  return Layout{t.size(0), t.size(1), t.size(2), t.size(3), t.size(2) * t.size(3),
                t.suggest_memory_format() == at::MemoryFormat::ChannelsLast};
}

// ---------------------------------------------------------------------------------------------------------
// Vector load/store in the accumulation type (fp32 for bf16/fp16, the type itself otherwise), by steps.
//
// A step is kVecs accumulation vectors: one for fp32/fp64; for bf16/fp16 two, i.e. the 16 elements of one
// Vectorized<scalar_t>, loaded as two 8-lane loads converted to float and stored by one 16-lane conversion and
// full-width store. Why not one float vector at a time: at::vec converts a single float vector to bf16 through
// the 16-lane conversion and stores 8 lanes through a stack buffer and memcpy. Why not one 16-lane load split in
// two: up to 1.2x slower (fp16). Measured in cache (4x64x28x28, one thread, AMD EPYC AVX2): bf16 bn_act 5-12%
// faster, backward_elemt with a residual gradient 1.2x (bf16) and 1.5x (fp16) faster, nothing slower.
// The elementwise kernels run whole steps, then (bf16/fp16) single vectors, then scalars (vector_steps). The
// reductions store nothing in scalar_t and keep single-vector loops: arrays of Vectorized (zeroed by its
// constructor) in their loops made GCC zero them with `rep stos` on every step, 3x slower (fp32 nchw reduce).
template <typename scalar_t>
struct VecIO {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr bool kReduced = at::vec::is_reduced_floating_point_v<scalar_t>;
  static constexpr int kVecs = kReduced ? 2 : 1;
  static constexpr int64_t kWidth = Vec::size();    // elements per accumulation vector
  static constexpr int64_t kStep = kVecs * kWidth;  // elements per step
  static_assert(!kReduced || Vectorized<scalar_t>::size() == kStep, "a reduced-type vector is two float vectors");

  static Vec load(const scalar_t* p) {
    if constexpr (kReduced) {
      Vec out;
      at::vec::load_to_float(p, out);
      return out;
    } else {
      return Vec::loadu(p);
    }
  }
  template <int K>
  static void load(const scalar_t* p, Vec (&v)[K]) {
    for (int k = 0; k < K; ++k) v[k] = load(p + k * kWidth);
  }
  template <int K>
  static void store(scalar_t* p, const Vec (&v)[K]) {
    if constexpr (kReduced && K == 2) {
      at::vec::convert_from_float<scalar_t>(v[0], v[1]).store(p);
    } else if constexpr (kReduced) {
      at::vec::convert_from_float<scalar_t>(v[0], v[0]).store(p, kWidth);
    } else {
      v[0].store(p);
    }
  }
};

template <int K>
using Steps = std::integral_constant<int, K>;

// Runs step(i, Steps<K>{}) over the longest prefix of [0, len) that whole vectors cover: steps of K = kVecs
// accumulation vectors from element i, then single vectors (bf16/fp16). Returns the prefix's length; the caller
// does the remaining elements in scalars.
template <typename scalar_t, typename Step>
C10_ALWAYS_INLINE int64_t vector_steps(int64_t len, const Step& step) {
  using IO = VecIO<scalar_t>;
  int64_t i = 0;
  for (; i + IO::kStep <= len; i += IO::kStep) step(i, Steps<IO::kVecs>{});
  if constexpr (IO::kVecs > 1) {
    for (; i + IO::kWidth <= len; i += IO::kWidth) step(i, Steps<1>{});
  }
  return i;
}

// A per-channel parameter: broadcast inside a plane (channel fixed), loaded along a row (channel = index).
template <bool kRow, typename acc_t>
inline Vectorized<acc_t> channel_vec(const acc_t* p, int64_t c, int64_t i) {
  if constexpr (kRow) {
    return Vectorized<acc_t>::loadu(p + i);
  } else {
    return Vectorized<acc_t>(p[c]);
  }
}

template <bool kRow, typename acc_t>
inline acc_t channel_val(const acc_t* p, int64_t c, int64_t i) {
  return kRow ? p[i] : p[c];
}

// PyTorch's relu keeps NaN; threshold_backward passes the gradient unless output <= 0.
template <typename acc_t>
inline Vectorized<acc_t> relu(const Vectorized<acc_t>& v) {
  return at::vec::maximum(v, Vectorized<acc_t>(acc_t(0)));
}
template <typename acc_t>
inline acc_t relu(acc_t v) {
  return std::isnan(v) ? v : std::max(v, acc_t(0));
}
template <typename acc_t>
inline Vectorized<acc_t> relu_mask(const Vectorized<acc_t>& grad, const Vectorized<acc_t>& out) {
  const Vectorized<acc_t> zero(acc_t(0));
  return Vectorized<acc_t>::blendv(grad, zero, out <= zero);
}
template <typename acc_t>
inline acc_t relu_mask(acc_t grad, acc_t out) {
  return out <= acc_t(0) ? acc_t(0) : grad;
}

// Runs body(kRow, offset, length, channel) over every contiguous segment, in parallel.
// kRow is std::true_type for channels_last rows (channel = index within the row), std::false_type for planes.
template <typename Body>
void for_each_segment(const Layout& L, const Body& body) {
  if (L.channels_last) {
    const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(L.C, 1));
    at::parallel_for(0, L.N * L.HW, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) body(std::true_type{}, row * L.C, L.C, int64_t(0));
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(L.HW, 1));
    at::parallel_for(0, L.N * L.C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) body(std::false_type{}, plane * L.HW, L.HW, plane % L.C);
    });
  }
}

// ---------------------------------------------------------------------------------------------------------
// batch_stats: per-channel mean and biased variance.

struct Moments {
  double count = 0, mean = 0, m2 = 0;
  void merge(double n_b, double mean_b, double m2_b) {
    if (n_b == 0) return;
    const double n = count + n_b;
    const double delta = mean_b - mean;
    mean += delta * (n_b / n);
    m2 += m2_b + delta * delta * (count * n_b / n);
    count = n;
  }
};

// The corrected two-pass moments of n values (Chan, Golub & LeVeque 1983) from the first pass's rounded mean m
// and the second pass's sums of d = x - m: the mean is m + sum(d)/n and M2 = sum(d^2) - sum(d)^2/n, exact up to
// the rounding of the sums even where m itself is off by many ulps (a large mean in fp32).
inline std::pair<double, double> corrected_moments(double n, double m, double sum_d, double sum_d2) {
  return {m + sum_d / n, sum_d2 - sum_d * sum_d / n};
}

// Two passes over one contiguous run of one channel's values (cache-resident): (mean, sum of squared deviations).
template <typename scalar_t>
std::pair<double, double> run_moments(const scalar_t* p, int64_t len) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  auto sum_lanes = [](const Vec& v) { return at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, v); };
  Vec vsum(acc_t(0));
  int64_t i = 0;
  for (; i + IO::kWidth <= len; i += IO::kWidth) vsum += IO::load(p + i);
  acc_t sum = sum_lanes(vsum);
  for (; i < len; ++i) sum += acc_t(p[i]);
  const acc_t mean = sum / acc_t(len);
  Vec vd(acc_t(0)), vd2(acc_t(0));
  const Vec vmean(mean);
  i = 0;
  for (; i + IO::kWidth <= len; i += IO::kWidth) {
    const Vec d = IO::load(p + i) - vmean;
    vd += d;
    vd2 = at::vec::fmadd(d, d, vd2);
  }
  acc_t sum_d = sum_lanes(vd), sum_d2 = sum_lanes(vd2);
  for (; i < len; ++i) {
    const acc_t d = acc_t(p[i]) - mean;
    sum_d += d;
    sum_d2 += d * d;
  }
  return corrected_moments(double(len), double(mean), double(sum_d), double(sum_d2));
}

template <typename scalar_t>
void batch_stats_planes(const scalar_t* x, const Layout& L, double* mean_out, double* var_out) {
  at::parallel_for(0, L.C, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      Moments acc;
      for (int64_t n = 0; n < L.N; ++n) {
        const scalar_t* plane = x + (n * L.C + c) * L.HW;
        for (int64_t start = 0; start < L.HW; start += kTileElements) {
          const int64_t len = std::min(kTileElements, L.HW - start);
          const auto [m, m2] = run_moments(plane + start, len);
          acc.merge(double(len), m, m2);
        }
      }
      mean_out[c] = acc.mean;
      var_out[c] = acc.m2 / acc.count;
    }
  });
}

// Rows per tile for channels_last reductions: whole rows, about kRowTileElements elements, and at least
// kMinTileRows so that the per-tile partials (a few doubles per channel) stay small next to the tile's data
// (with 4 rows of 1024 channels they were as large as the input, and the reduction ran 2x slower than ATen's).
// A tile is reduced block of channels by block while the next one is prefetched, so both must stay in L2: with
// 64 rows of 1024 channels (three 256 KiB streams) backward_reduce ran at 0.67x-1.03x the row-by-row loop from run
// to run, with 16 rows 0.99x-1.15x.
constexpr int64_t kRowTileElements = 16384;
constexpr int64_t kMinTileRows = 16;
int64_t rows_per_tile(const Layout& L) {
  return std::max<int64_t>(kMinTileRows, kRowTileElements / std::max<int64_t>(L.C, 1));
}

// Channels per task when the per-tile partials of a channels_last reduction are merged: the merge is cheap
// next to the pass over the data, so it runs on one thread unless each task gets kMergeGrain tile-channel
// pairs. Why not split it anyway: a parallel region costs a wake-up of the other threads, and on a machine shared
// with other processes a wait for a time slice. Vectorized, the merge is cheap: measured (16x64x56x56
// channels_last, one thread, min of 40 calls) batch_stats bf16 1.20 -> 1.04 ms, fp32 1.55 -> 1.30 ms against the
// per-channel merge in 4-channel parallel tasks it replaces.
constexpr int64_t kMergeGrain = 1 << 20;
int64_t merge_grain(int64_t tiles) { return std::max<int64_t>(1, kMergeGrain / std::max<int64_t>(tiles, 1)); }

// The channels of a row in blocks of K accumulation vectors whose accumulators stay in registers across a tile's
// rows: block(i, Steps<K>{}) for channels [i, i + K * kWidth), blocks of kBlock vectors, then single vectors.
// Returns the vectorized prefix; the caller does the remaining channels in scalars. Each channel still sums a
// tile's rows in row order, the arithmetic of one accumulator per channel in memory, but the accumulators no
// longer cost a load and a store per vector and row: measured against the row-by-row loop
// (fp32 channels_last, 2 threads, interleaved, median of 25 ratios) batch_stats 1.6-2.1x and backward_reduce
// 1.4-2.2x faster at 16x128x20x20 and 16x64x40x40, 1.2-1.9x and 1.0-1.5x at 26 MB (16x256x40x40, 16x64x80x80).
template <typename scalar_t, int kBlock, typename Block>
C10_ALWAYS_INLINE int64_t channel_blocks(int64_t C, const Block& block) {
  constexpr int64_t kWidth = VecIO<scalar_t>::kWidth;
  int64_t i = 0;
  for (; i + kBlock * kWidth <= C; i += kBlock * kWidth) block(i, Steps<kBlock>{});
  for (; i + kWidth <= C; i += kWidth) block(i, Steps<1>{});
  return i;
}

// Accumulation vectors per channel block of a channels_last reduction: 4 (32 fp32 channels) leaves registers for
// the loads and the per-channel parameters with up to 3 sums per channel (AVX2 has 16 vector registers).
constexpr int kRowBlockVecs = 4;

// A channels_last reduction reads a tile block of channels by block, a strided pattern that the hardware
// prefetchers do not stream from memory: out of cache, backward_reduce ran at 0.74x the row-by-row loop it
// replaced (16x256x40x40 fp32). So the iteration over (block at channel i, row r) of the tile [r0, r1) prefetches
// its share of the next tile in address order: K * kWidth elements from next_tile_share(...), the next tile's
// element r1 * C + i * (r1 - r0) + (r - r0) * K * kWidth, or -1 past its end. Measured: 1.15x (that shape) and
// 1.28x (16x64x80x80) the row-by-row loop, in cache as fast as without.
inline int64_t next_tile_share(int64_t r0, int64_t r1, int64_t rows, int64_t C, int64_t i, int64_t r, int64_t block) {
  const int64_t e = r1 * C + i * (r1 - r0) + (r - r0) * block;
  return e < std::min(rows, r1 + (r1 - r0)) * C ? e : -1;
}

// Prefetches (into L2) the cache lines of elements [e, e + len) of p; nothing for e = -1 (next_tile_share past the
// last tile). On x86 as an asm statement: for __builtin_prefetch, GCC 13 at -O3 emitted no instruction in most
// backward_reduce instantiations (seen in the assembly), and those ran as slowly as with no prefetch.
template <typename scalar_t>
C10_ALWAYS_INLINE void prefetch_elements(const scalar_t* p, int64_t e, int64_t len) {
  if (e < 0) return;
  const char* bytes = reinterpret_cast<const char*>(p + e);
  for (int64_t b = 0; b < len * int64_t(sizeof(scalar_t)); b += 64) {
#if defined(__x86_64__)
    asm volatile("prefetcht1 %0" : : "m"(bytes[b]));
#else
    __builtin_prefetch(bytes + b, 0, 2);
#endif
  }
}

template <typename scalar_t>
void batch_stats_rows(const scalar_t* x, const Layout& L, double* mean_out, double* var_out) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  const int64_t rows = L.N * L.HW, C = L.C;
  const int64_t tile_rows = rows_per_tile(L);
  const int64_t tiles = (rows + tile_rows - 1) / tile_rows;
  // Per tile and channel: mean and M2 (the count of a tile is its number of rows).
  std::vector<double> tile_mean(tiles * C), tile_m2(tiles * C);
  at::parallel_for(0, tiles, 1, [&](int64_t t_begin, int64_t t_end) {
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t r0 = t * tile_rows, r1 = std::min(rows, r0 + tile_rows);
      const double n = double(r1 - r0);
      const acc_t inv_n = acc_t(1) / acc_t(r1 - r0);
      double* out_mean = tile_mean.data() + t * C;
      double* out_m2 = tile_m2.data() + t * C;
      // Two passes over the tile's rows for a block of channels (in cache): the mean, then the sums of deviations.
      const int64_t vectorized = channel_blocks<scalar_t, kRowBlockVecs>(C, [&](int64_t i, auto steps) {
        constexpr int K = steps.value;
        Vec mean[K], dsum[K], m2[K];
        for (int k = 0; k < K; ++k) mean[k] = Vec(acc_t(0));
        for (int64_t r = r0; r < r1; ++r) {
          prefetch_elements(x, next_tile_share(r0, r1, rows, C, i, r, K * IO::kWidth), K * IO::kWidth);
          for (int k = 0; k < K; ++k) mean[k] += IO::load(x + r * C + i + k * IO::kWidth);
        }
        for (int k = 0; k < K; ++k) {
          mean[k] = mean[k] * Vec(inv_n);
          dsum[k] = m2[k] = Vec(acc_t(0));
        }
        for (int64_t r = r0; r < r1; ++r) {
          for (int k = 0; k < K; ++k) {
            const Vec d = IO::load(x + r * C + i + k * IO::kWidth) - mean[k];
            dsum[k] += d;
            m2[k] = at::vec::fmadd(d, d, m2[k]);
          }
        }
        acc_t lanes[3][K * IO::kWidth];
        for (int k = 0; k < K; ++k) {
          mean[k].store(lanes[0] + k * IO::kWidth);
          dsum[k].store(lanes[1] + k * IO::kWidth);
          m2[k].store(lanes[2] + k * IO::kWidth);
        }
        for (int64_t j = 0; j < K * IO::kWidth; ++j) {
          std::tie(out_mean[i + j], out_m2[i + j]) =
              corrected_moments(n, double(lanes[0][j]), double(lanes[1][j]), double(lanes[2][j]));
        }
      });
      for (int64_t c = vectorized; c < C; ++c) {
        acc_t sum = 0, dsum = 0, m2 = 0;
        for (int64_t r = r0; r < r1; ++r) sum += acc_t(x[r * C + c]);
        const acc_t mean = sum * inv_n;
        for (int64_t r = r0; r < r1; ++r) {
          const acc_t d = acc_t(x[r * C + c]) - mean;
          dsum += d;
          m2 += d * d;
        }
        std::tie(out_mean[c], out_m2[c]) = corrected_moments(n, double(mean), double(dsum), double(m2));
      }
    }
  });
  // Each channel's tiles merged in tile order with Moments::merge's arithmetic, written tile by tile across
  // channels so that it vectorizes (the count is the same for every channel).
  at::parallel_for(0, C, merge_grain(tiles), [&](int64_t c_begin, int64_t c_end) {
    double count = 0;
    for (int64_t c = c_begin; c < c_end; ++c) mean_out[c] = var_out[c] = 0;  // var_out holds M2 until the end
    for (int64_t t = 0; t < tiles; ++t) {
      const double n_b = double(std::min(rows, (t + 1) * tile_rows) - t * tile_rows);
      const double n = count + n_b, w_mean = n_b / n, w_m2 = count * n_b / n;
      const double* tm = tile_mean.data() + t * C;
      const double* tm2 = tile_m2.data() + t * C;
      for (int64_t c = c_begin; c < c_end; ++c) {
        const double delta = tm[c] - mean_out[c];
        mean_out[c] += delta * w_mean;
        var_out[c] += tm2[c] + delta * delta * w_m2;
      }
      count = n;
    }
    for (int64_t c = c_begin; c < c_end; ++c) var_out[c] /= count;
  });
}

// ---------------------------------------------------------------------------------------------------------
// bn_act: out = [relu]((x - mean[c]) * scale[c] + shift[c] + residual term)

enum class Residual { kNone, kIdentity, kAffine };  // none; + r; + (r - mean[c]) * scale[c] + shift[c] of res_norm

// A BatchNorm in the centered form (x - mean[c]) * scale[c] + shift[c]: with the mean folded into the shift, a
// large mean cancels against it (docs/design.md §4).
template <typename acc_t>
struct ChannelNorm {
  const acc_t* mean;
  const acc_t* scale;
  const acc_t* shift;

  ChannelNorm from_channel(int64_t c) const { return {mean + c, scale + c, shift + c}; }

  template <bool kRow>
  Vectorized<acc_t> apply(const Vectorized<acc_t>& x, int64_t c, int64_t i) const {
    return at::vec::fmadd(x - channel_vec<kRow>(mean, c, i), channel_vec<kRow>(scale, c, i),
                          channel_vec<kRow>(shift, c, i));
  }
  template <bool kRow>
  acc_t apply(acc_t x, int64_t c, int64_t i) const {
    return (x - channel_val<kRow>(mean, c, i)) * channel_val<kRow>(scale, c, i) + channel_val<kRow>(shift, c, i);
  }
};

// One contiguous run of `len` elements: out = [relu](norm(x) + R), R from `res` (kIdentity: every `res_step`-th
// element from res; kAffine: res_norm(res)). Parameters as channel_vec reads them: along a row (pointers already at
// the run's first channel) or broadcast from channel c of a plane. The norms come by value, for the reason
// backward_elemt_kernel copies its arguments (in cache up to 1.3x faster).
template <typename scalar_t, Residual kResidual, bool kRelu, bool kRow>
inline void bn_act_run(const scalar_t* x, const scalar_t* res, int64_t res_step, scalar_t* out, int64_t len,
                       int64_t c, const ChannelNorm<acc_type<scalar_t>> norm,
                       const ChannelNorm<acc_type<scalar_t>> res_norm) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  // The residual's K vectors from element i: contiguous, or every res_step-th element (option A's subsampling).
  auto load_residual = [&](int64_t i, auto& r) {
    constexpr int K = std::extent_v<std::remove_reference_t<decltype(r)>>;
    if (res_step == 1) return IO::load(res + i, r);
    acc_t gathered[K * IO::kWidth];
    for (int64_t k = 0; k < K * IO::kWidth; ++k) gathered[k] = acc_t(res[(i + k) * res_step]);
    for (int k = 0; k < K; ++k) r[k] = Vec::loadu(gathered + k * IO::kWidth);
  };
  int64_t i = vector_steps<scalar_t>(len, [&](int64_t j, auto steps) {
    constexpr int K = steps.value;
    Vec v[K], r[K];
    IO::load(x + j, v);
    if constexpr (kResidual == Residual::kIdentity) load_residual(j, r);
    if constexpr (kResidual == Residual::kAffine) IO::load(res + j, r);
    for (int k = 0; k < K; ++k) {
      const int64_t jk = j + k * IO::kWidth;
      v[k] = norm.template apply<kRow>(v[k], c, jk);
      if constexpr (kResidual == Residual::kIdentity) v[k] += r[k];
      if constexpr (kResidual == Residual::kAffine) v[k] += res_norm.template apply<kRow>(r[k], c, jk);
      if constexpr (kRelu) v[k] = relu(v[k]);
    }
    IO::store(out + j, v);
  });
  for (; i < len; ++i) {
    acc_t v = norm.template apply<kRow>(acc_t(x[i]), c, i);
    if constexpr (kResidual == Residual::kIdentity) v += acc_t(res[i * res_step]);
    if constexpr (kResidual == Residual::kAffine) v += res_norm.template apply<kRow>(acc_t(res[i]), c, i);
    if constexpr (kRelu) v = relu(v);
    out[i] = scalar_t(v);
  }
}

template <typename scalar_t, Residual kResidual, bool kRelu>
void bn_act_kernel(const Layout& L, const scalar_t* x, const ChannelNorm<acc_type<scalar_t>>& norm,
                   const scalar_t* res, const ChannelNorm<acc_type<scalar_t>>& res_norm, scalar_t* out) {
  for_each_segment(L, [&](auto row_tag, int64_t off, int64_t len, int64_t c) {
    constexpr bool kRow = decltype(row_tag)::value;
    bn_act_run<scalar_t, kResidual, kRelu, kRow>(x + off, res ? res + off : nullptr, 1, out + off, len, c, norm,
                                                 res_norm);
  });
}

// The residual of option A shortcuts (He et al. 2015): R[n, c, h, w] = res[n, c - offset, h * stride, w * stride]
// for the channels res has, zero for the others, read in place: the subsampled, zero-padded tensor is never made.
template <typename scalar_t, bool kRelu>
void bn_act_padded_kernel(const Layout& L, const scalar_t* x, const ChannelNorm<acc_type<scalar_t>>& norm,
                          const scalar_t* res, const Layout& R, int64_t stride, int64_t offset, scalar_t* out) {
  const ChannelNorm<acc_type<scalar_t>> no_norm{};
  for_each_segment(L, [&](auto row_tag, int64_t off, int64_t len, int64_t c) {
    constexpr bool kRow = decltype(row_tag)::value;
    if constexpr (kRow) {
      // A row (n, h, w) of C channels: the residual row is contiguous over channels [offset, offset + R.C).
      const int64_t row = off / L.C, n = row / L.HW, h = (row % L.HW) / L.W, w = row % L.W;
      const scalar_t* res_row = res + ((n * R.H + h * stride) * R.W + w * stride) * R.C;
      const int64_t begin = offset, end = offset + R.C;
      bn_act_run<scalar_t, Residual::kNone, kRelu, true>(x + off, nullptr, 1, out + off, begin, 0, norm, no_norm);
      bn_act_run<scalar_t, Residual::kIdentity, kRelu, true>(x + off + begin, res_row, 1, out + off + begin,
                                                             end - begin, 0, norm.from_channel(begin), no_norm);
      bn_act_run<scalar_t, Residual::kNone, kRelu, true>(x + off + end, nullptr, 1, out + off + end, len - end, 0,
                                                         norm.from_channel(end), no_norm);
    } else {
      // A plane (n, c): no residual outside res's channels; inside, row h reads every stride-th element of
      // residual row h * stride.
      const int64_t n = off / (L.C * L.HW), cr = c - offset;
      if (cr < 0 || cr >= R.C) {
        bn_act_run<scalar_t, Residual::kNone, kRelu, false>(x + off, nullptr, 1, out + off, len, c, norm, no_norm);
        return;
      }
      const scalar_t* res_plane = res + (n * R.C + cr) * R.HW;
      for (int64_t h = 0; h < L.H; ++h) {
        bn_act_run<scalar_t, Residual::kIdentity, kRelu, false>(x + off + h * L.W, res_plane + h * stride * R.W,
                                                                stride, out + off + h * L.W, L.W, c, norm, no_norm);
      }
    }
  });
}

template <typename scalar_t, Residual kResidual>
void bn_act_dispatch_relu(bool relu, const Layout& L, const scalar_t* x,
                          const ChannelNorm<acc_type<scalar_t>>& norm, const scalar_t* res,
                          const ChannelNorm<acc_type<scalar_t>>& res_norm, scalar_t* out) {
  if (relu) {
    bn_act_kernel<scalar_t, kResidual, true>(L, x, norm, res, res_norm, out);
  } else {
    bn_act_kernel<scalar_t, kResidual, false>(L, x, norm, res, res_norm, out);
  }
}

// ---------------------------------------------------------------------------------------------------------
// The backward kernels' ReLU mask (gm = grad where the ReLU's output > 0): none; from the saved output; or from
// the input, recomputed as input_norm(x) > 0 with bn_act's own arithmetic (ChannelNorm::apply, the same vector or
// scalar path for the same element: both kernels walk the same segments in the same steps), so that it equals
// the mask of bn_act's output bit for bit, without reading that output.
enum class Mask { kNone, kOutput, kInput };

// ---------------------------------------------------------------------------------------------------------
// bn_act_backward_reduce: per channel, with gm = grad masked by the ReLU:
//   sum(gm), sum(gm * (x - mean)) and, for a second BN sharing the gradient, sum(gm * (x2 - mean2)).

// The terms one element adds to the sums: gm, gm * (x - mean) and gm * (x2 - mean2); T is a Vec or a scalar.
template <typename scalar_t, Mask kMask, bool kSecond>
struct ReduceTerms {
  using acc_t = acc_type<scalar_t>;
  const scalar_t *g, *out, *x, *x2;
  const acc_t *mean, *mean2;
  ChannelNorm<acc_t> input_norm;  // kInput: (mean, mask_scale, mask_shift)

  void prefetch(int64_t e, int64_t len) const {
    for (const scalar_t* p : {g, out, x, x2}) {
      if (p != nullptr) prefetch_elements(p, e, len);
    }
  }

  template <bool kRow>
  void vec(int64_t off, int64_t i, int64_t c, Vectorized<acc_t> (&t)[3]) const {
    using IO = VecIO<scalar_t>;
    t[0] = IO::load(g + off + i);
    if constexpr (kMask == Mask::kOutput) t[0] = relu_mask(t[0], IO::load(out + off + i));
    const Vectorized<acc_t> xv = IO::load(x + off + i);
    if constexpr (kMask == Mask::kInput) t[0] = relu_mask(t[0], input_norm.template apply<kRow>(xv, c, i));
    t[1] = t[0] * (xv - channel_vec<kRow>(mean, c, i));
    if constexpr (kSecond) t[2] = t[0] * (IO::load(x2 + off + i) - channel_vec<kRow>(mean2, c, i));
  }
  template <bool kRow>
  void scalar(int64_t off, int64_t i, int64_t c, acc_t (&t)[3]) const {
    t[0] = acc_t(g[off + i]);
    if constexpr (kMask == Mask::kOutput) t[0] = relu_mask(t[0], acc_t(out[off + i]));
    const acc_t xv = acc_t(x[off + i]);
    if constexpr (kMask == Mask::kInput) t[0] = relu_mask(t[0], input_norm.template apply<kRow>(xv, c, i));
    t[1] = t[0] * (xv - channel_val<kRow>(mean, c, i));
    if constexpr (kSecond) t[2] = t[0] * (acc_t(x2[off + i]) - channel_val<kRow>(mean2, c, i));
  }
};

template <typename scalar_t, Mask kMask, bool kSecond>
void backward_reduce_kernel(const Layout& L, const ReduceTerms<scalar_t, kMask, kSecond>& terms,
                            double* const sums[3]) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int kSums = kSecond ? 3 : 2;
  if (!L.channels_last) {
    // Planes: one channel per task; each tile sums in float lanes (registers), tiles add up in double.
    at::parallel_for(0, L.C, 1, [&](int64_t c_begin, int64_t c_end) {
      for (int64_t c = c_begin; c < c_end; ++c) {
        double total[3] = {};
        for (int64_t n = 0; n < L.N; ++n) {
          const int64_t plane = (n * L.C + c) * L.HW;
          for (int64_t start = 0; start < L.HW; start += kTileElements) {
            const int64_t off = plane + start, len = std::min(kTileElements, L.HW - start);
            Vec lanes[3] = {Vec(acc_t(0)), Vec(acc_t(0)), Vec(acc_t(0))};
            Vec t[3];
            int64_t i = 0;
            for (; i + IO::kWidth <= len; i += IO::kWidth) {
              terms.template vec<false>(off, i, c, t);
              for (int s = 0; s < kSums; ++s) lanes[s] += t[s];
            }
            acc_t tail[3] = {}, ts[3];
            for (; i < len; ++i) {
              terms.template scalar<false>(off, i, c, ts);
              for (int s = 0; s < kSums; ++s) tail[s] += ts[s];
            }
            for (int s = 0; s < kSums; ++s) {
              total[s] += double(at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, lanes[s])) +
                          double(tail[s]);
            }
          }
        }
        for (int s = 0; s < kSums; ++s) sums[s][c] = total[s];
      }
    });
    return;
  }
  // Rows: fixed tiles of whole rows, per-tile float sums per channel (register blocks of channels), merged in
  // tile order in double.
  const int64_t rows = L.N * L.HW, C = L.C;
  const int64_t tile_rows = rows_per_tile(L);
  const int64_t tiles = (rows + tile_rows - 1) / tile_rows;
  std::vector<double> partial(tiles * kSums * C);
  at::parallel_for(0, tiles, 1, [&](int64_t t_begin, int64_t t_end) {
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t r0 = t * tile_rows, r1 = std::min(rows, r0 + tile_rows);
      double* out = partial.data() + t * kSums * C;
      const int64_t vectorized = channel_blocks<scalar_t, kRowBlockVecs>(C, [&](int64_t i, auto steps) {
        constexpr int K = steps.value;
        Vec acc[kSums][K];
        for (int s = 0; s < kSums; ++s) {
          for (int k = 0; k < K; ++k) acc[s][k] = Vec(acc_t(0));
        }
        for (int64_t r = r0; r < r1; ++r) {
          terms.prefetch(next_tile_share(r0, r1, rows, C, i, r, K * IO::kWidth), K * IO::kWidth);
          for (int k = 0; k < K; ++k) {
            Vec v[3];
            terms.template vec<true>(r * C, i + k * IO::kWidth, 0, v);
            for (int s = 0; s < kSums; ++s) acc[s][k] += v[s];
          }
        }
        acc_t lanes[K * IO::kWidth];
        for (int s = 0; s < kSums; ++s) {
          for (int k = 0; k < K; ++k) acc[s][k].store(lanes + k * IO::kWidth);
          for (int64_t j = 0; j < K * IO::kWidth; ++j) out[s * C + i + j] = double(lanes[j]);
        }
      });
      for (int64_t c = vectorized; c < C; ++c) {
        acc_t acc[3] = {}, ts[3];
        for (int64_t r = r0; r < r1; ++r) {
          terms.template scalar<true>(r * C, c, 0, ts);
          for (int s = 0; s < kSums; ++s) acc[s] += ts[s];
        }
        for (int s = 0; s < kSums; ++s) out[s * C + c] = double(acc[s]);
      }
    }
  });
  // Each channel's partials added in tile order, tile by tile across channels so that it vectorizes.
  at::parallel_for(0, C, merge_grain(tiles), [&](int64_t c_begin, int64_t c_end) {
    for (int s = 0; s < kSums; ++s) {
      double* total = sums[s];
      for (int64_t c = c_begin; c < c_end; ++c) total[c] = 0;
      for (int64_t t = 0; t < tiles; ++t) {
        const double* tile = partial.data() + (t * kSums + s) * C;
        for (int64_t c = c_begin; c < c_end; ++c) total[c] += tile[c];
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// bn_act_backward_elemt: with gm = grad masked by the ReLU (Mask),
//   grad_input = coef_dy[c] * gm + coef_xmu[c] * (x - mean[c]) + coef_const[c]
//   grad_other = the same for (input2, mean2, coef2_*), or gm itself (the gradient of an identity residual).

enum class Other { kNone, kMaskedGrad, kSecondBN };

template <typename scalar_t>
struct ElemtArgs {
  using acc_t = acc_type<scalar_t>;
  const scalar_t *g, *out, *x, *x2;
  const acc_t *mean, *k_dy, *k_xmu, *k_0, *mean2, *k2_dy, *k2_xmu, *k2_0;
  ChannelNorm<acc_t> input_norm;  // Mask::kInput: (mean, mask_scale, mask_shift)
  scalar_t *grad_x, *grad_other;
};

template <typename scalar_t, Mask kMask, Other kOther>
void backward_elemt_kernel(const Layout& L, const ElemtArgs<scalar_t>& args) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  for_each_segment(L, [&](auto row_tag, int64_t off, int64_t len, int64_t c) {
    constexpr bool kRow = decltype(row_tag)::value;
    // A local copy, so that its pointers stay in registers: through the reference every vector store (an
    // __m256, which may alias anything) made GCC reload all of them (measured 1.0-1.5x faster with the copy).
    const ElemtArgs<scalar_t> a = args;
    int64_t i = vector_steps<scalar_t>(len, [&](int64_t j, auto steps) {
      constexpr int K = steps.value;
      Vec gm[K], o[K], xv[K], x2v[K], gx[K], g2[K];
      IO::load(a.g + off + j, gm);
      if constexpr (kMask == Mask::kOutput) IO::load(a.out + off + j, o);
      IO::load(a.x + off + j, xv);
      if constexpr (kOther == Other::kSecondBN) IO::load(a.x2 + off + j, x2v);
      for (int k = 0; k < K; ++k) {
        const int64_t jk = j + k * IO::kWidth;
        if constexpr (kMask == Mask::kOutput) gm[k] = relu_mask(gm[k], o[k]);
        if constexpr (kMask == Mask::kInput) gm[k] = relu_mask(gm[k], a.input_norm.template apply<kRow>(xv[k], c, jk));
        const Vec xmu = xv[k] - channel_vec<kRow>(a.mean, c, jk);
        gx[k] = at::vec::fmadd(channel_vec<kRow>(a.k_dy, c, jk), gm[k],
                               at::vec::fmadd(channel_vec<kRow>(a.k_xmu, c, jk), xmu, channel_vec<kRow>(a.k_0, c, jk)));
        if constexpr (kOther == Other::kSecondBN) {
          const Vec xmu2 = x2v[k] - channel_vec<kRow>(a.mean2, c, jk);
          g2[k] = at::vec::fmadd(channel_vec<kRow>(a.k2_dy, c, jk), gm[k],
                                 at::vec::fmadd(channel_vec<kRow>(a.k2_xmu, c, jk), xmu2,
                                                channel_vec<kRow>(a.k2_0, c, jk)));
        }
      }
      IO::store(a.grad_x + off + j, gx);
      if constexpr (kOther == Other::kMaskedGrad) IO::store(a.grad_other + off + j, gm);
      if constexpr (kOther == Other::kSecondBN) IO::store(a.grad_other + off + j, g2);
    });
    for (; i < len; ++i) {
      acc_t gm = acc_t(a.g[off + i]);
      if constexpr (kMask == Mask::kOutput) gm = relu_mask(gm, acc_t(a.out[off + i]));
      const acc_t xv = acc_t(a.x[off + i]);
      if constexpr (kMask == Mask::kInput) gm = relu_mask(gm, a.input_norm.template apply<kRow>(xv, c, i));
      const acc_t xmu = xv - channel_val<kRow>(a.mean, c, i);
      a.grad_x[off + i] = scalar_t(channel_val<kRow>(a.k_dy, c, i) * gm + channel_val<kRow>(a.k_xmu, c, i) * xmu +
                                   channel_val<kRow>(a.k_0, c, i));
      if constexpr (kOther == Other::kMaskedGrad) a.grad_other[off + i] = scalar_t(gm);
      if constexpr (kOther == Other::kSecondBN) {
        const acc_t xmu2 = acc_t(a.x2[off + i]) - channel_val<kRow>(a.mean2, c, i);
        a.grad_other[off + i] = scalar_t(channel_val<kRow>(a.k2_dy, c, i) * gm +
                                         channel_val<kRow>(a.k2_xmu, c, i) * xmu2 + channel_val<kRow>(a.k2_0, c, i));
      }
    }
  });
}

template <typename scalar_t, Other kOther>
void backward_elemt_dispatch_mask(Mask mask, const Layout& L, const ElemtArgs<scalar_t>& a) {
  switch (mask) {
    case Mask::kOutput:
      return backward_elemt_kernel<scalar_t, Mask::kOutput, kOther>(L, a);
    case Mask::kInput:
      return backward_elemt_kernel<scalar_t, Mask::kInput, kOther>(L, a);
    case Mask::kNone:
      return backward_elemt_kernel<scalar_t, Mask::kNone, kOther>(L, a);
  }
}

// Which mask the backward kernels apply: the output's, the input's (mask_scale defined), or none.
inline Mask mask_of(const at::Tensor& output, const at::Tensor& mask_scale) {
  return output.defined() ? Mask::kOutput : mask_scale.defined() ? Mask::kInput : Mask::kNone;
}

// ---------------------------------------------------------------------------------------------------------
// The table entries: dtype dispatch onto the kernels above.

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// Per-channel results, merged in double, stored in the outputs' dtype (the accumulation dtype: float, or double
// for double inputs) here rather than by a .to() of double tensors: that was two to three more copies per
// BatchNorm and step (a converted resnet18's train step: 91 of its copy_ calls).
void store_channels(const std::vector<double>& values, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "store_channels", [&] {
    scalar_t* dst = out.data_ptr<scalar_t>();
    for (size_t c = 0; c < values.size(); ++c) dst[c] = scalar_t(values[c]);
  });
}

void batch_stats(const at::Tensor& input, at::Tensor& mean, at::Tensor& var) {
  const Layout L = layout_of(input);
  std::vector<double> mean_d(L.C), var_d(L.C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "batch_stats", [&] {
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    if (L.channels_last) {
      batch_stats_rows(x, L, mean_d.data(), var_d.data());
    } else {
      batch_stats_planes(x, L, mean_d.data(), var_d.data());
    }
  });
  store_channels(mean_d, mean);
  store_channels(var_d, var);
}

void bn_act(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& scale, const at::Tensor& shift,
            const at::Tensor& residual, const at::Tensor& residual_mean, const at::Tensor& residual_scale,
            const at::Tensor& residual_shift, bool relu, at::Tensor& out) {
  const Layout L = layout_of(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "bn_act", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* r = ptr_or_null<scalar_t>(residual);
    const ChannelNorm<acc_t> norm{mean.const_data_ptr<acc_t>(), scale.const_data_ptr<acc_t>(),
                                  shift.const_data_ptr<acc_t>()};
    const ChannelNorm<acc_t> res_norm{ptr_or_null<acc_t>(residual_mean), ptr_or_null<acc_t>(residual_scale),
                                      ptr_or_null<acc_t>(residual_shift)};
    scalar_t* o = out.data_ptr<scalar_t>();
    if (!r) {
      bn_act_dispatch_relu<scalar_t, Residual::kNone>(relu, L, x, norm, r, res_norm, o);
    } else if (!res_norm.scale) {
      bn_act_dispatch_relu<scalar_t, Residual::kIdentity>(relu, L, x, norm, r, res_norm, o);
    } else {
      bn_act_dispatch_relu<scalar_t, Residual::kAffine>(relu, L, x, norm, r, res_norm, o);
    }
  });
}

void bn_act_padded(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& scale, const at::Tensor& shift,
                   const at::Tensor& residual, int64_t stride, int64_t channel_offset, bool relu, at::Tensor& out) {
  const Layout L = layout_of(input), R = layout_of(residual);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "bn_act", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* r = residual.const_data_ptr<scalar_t>();
    const ChannelNorm<acc_t> norm{mean.const_data_ptr<acc_t>(), scale.const_data_ptr<acc_t>(),
                                  shift.const_data_ptr<acc_t>()};
    scalar_t* o = out.data_ptr<scalar_t>();
    if (relu) {
      bn_act_padded_kernel<scalar_t, true>(L, x, norm, r, R, stride, channel_offset, o);
    } else {
      bn_act_padded_kernel<scalar_t, false>(L, x, norm, r, R, stride, channel_offset, o);
    }
  });
}

// Runs backward_reduce_kernel with the terms' mask and second-BN branches chosen at compile time.
template <typename scalar_t, Mask kMask>
void backward_reduce_dispatch_second(const Layout& L, const ReduceTerms<scalar_t, kMask, false>& terms,
                                     double* const sums[3]) {
  if (terms.x2) {
    backward_reduce_kernel(L, ReduceTerms<scalar_t, kMask, true>{terms.g, terms.out, terms.x, terms.x2, terms.mean,
                                                                 terms.mean2, terms.input_norm},
                           sums);
  } else {
    backward_reduce_kernel(L, terms, sums);
  }
}

void backward_reduce(const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& input,
                     const at::Tensor& mean, const at::Tensor& input2, const at::Tensor& mean2,
                     const at::Tensor& mask_scale, const at::Tensor& mask_shift, at::Tensor& sum_dy,
                     at::Tensor& sum_dy_xmu, at::Tensor& sum_dy_xmu2) {
  const Layout L = layout_of(input);
  std::vector<double> sum_dy_d(L.C), sum_dy_xmu_d(L.C), sum_dy_xmu2_d(input2.defined() ? L.C : 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "bn_act_backward_reduce", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* g = grad_output.const_data_ptr<scalar_t>();
    const scalar_t* o = ptr_or_null<scalar_t>(output);
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* x2 = ptr_or_null<scalar_t>(input2);
    const acc_t* m = mean.const_data_ptr<acc_t>();
    const acc_t* m2 = ptr_or_null<acc_t>(mean2);
    double* const sums[3] = {sum_dy_d.data(), sum_dy_xmu_d.data(), x2 ? sum_dy_xmu2_d.data() : nullptr};
    const ChannelNorm<acc_t> input_norm{m, ptr_or_null<acc_t>(mask_scale), ptr_or_null<acc_t>(mask_shift)};
    switch (mask_of(output, mask_scale)) {
      case Mask::kOutput:
        return backward_reduce_dispatch_second<scalar_t, Mask::kOutput>(
            L, ReduceTerms<scalar_t, Mask::kOutput, false>{g, o, x, x2, m, m2, input_norm}, sums);
      case Mask::kInput:
        return backward_reduce_dispatch_second<scalar_t, Mask::kInput>(
            L, ReduceTerms<scalar_t, Mask::kInput, false>{g, o, x, x2, m, m2, input_norm}, sums);
      case Mask::kNone:
        return backward_reduce_dispatch_second<scalar_t, Mask::kNone>(
            L, ReduceTerms<scalar_t, Mask::kNone, false>{g, o, x, x2, m, m2, input_norm}, sums);
    }
  });
  store_channels(sum_dy_d, sum_dy);
  store_channels(sum_dy_xmu_d, sum_dy_xmu);
  store_channels(sum_dy_xmu2_d, sum_dy_xmu2);
}

void backward_elemt(const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& input,
                    const at::Tensor& mean, const at::Tensor& coef_dy, const at::Tensor& coef_xmu,
                    const at::Tensor& coef_const, const at::Tensor& input2, const at::Tensor& mean2,
                    const at::Tensor& coef2_dy, const at::Tensor& coef2_xmu, const at::Tensor& coef2_const,
                    bool residual_grad, const at::Tensor& mask_scale, const at::Tensor& mask_shift,
                    at::Tensor& grad_input, at::Tensor& grad_other) {
  const Layout L = layout_of(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "bn_act_backward_elemt", [&] {
    using acc_t = acc_type<scalar_t>;
    const ElemtArgs<scalar_t> a{grad_output.const_data_ptr<scalar_t>(),
                                ptr_or_null<scalar_t>(output),
                                input.const_data_ptr<scalar_t>(),
                                ptr_or_null<scalar_t>(input2),
                                mean.const_data_ptr<acc_t>(),
                                coef_dy.const_data_ptr<acc_t>(),
                                coef_xmu.const_data_ptr<acc_t>(),
                                coef_const.const_data_ptr<acc_t>(),
                                ptr_or_null<acc_t>(mean2),
                                ptr_or_null<acc_t>(coef2_dy),
                                ptr_or_null<acc_t>(coef2_xmu),
                                ptr_or_null<acc_t>(coef2_const),
                                {mean.const_data_ptr<acc_t>(), ptr_or_null<acc_t>(mask_scale),
                                 ptr_or_null<acc_t>(mask_shift)},
                                grad_input.data_ptr<scalar_t>(),
                                grad_other.defined() ? grad_other.data_ptr<scalar_t>() : nullptr};
    const Mask mask = mask_of(output, mask_scale);
    if (input2.defined()) backward_elemt_dispatch_mask<scalar_t, Other::kSecondBN>(mask, L, a);
    else if (residual_grad) backward_elemt_dispatch_mask<scalar_t, Other::kMaskedGrad>(mask, L, a);
    else backward_elemt_dispatch_mask<scalar_t, Other::kNone>(mask, L, a);
  });
}

}  // namespace
}  // namespace fused_resnet

#include "winograd_impl.h"

namespace fused_resnet {

const CpuKernels& FUSED_RESNET_KERNEL_TABLE() {
  static const CpuKernels table{&batch_stats,
                                &bn_act,
                                &bn_act_padded,
                                &backward_reduce,
                                &backward_elemt,
                                &winograd_weight_transform,
                                &winograd_input_transform,
                                &winograd_output_transform,
                                &winograd_grad_output_transform,
                                &winograd_weight_grad_transform};
  return table;
}

}  // namespace fused_resnet
