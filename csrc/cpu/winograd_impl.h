// The CPU kernels of winograd_conv3x3 (float32, channels_last), compiled once per CPU capability with the rest of
// the table: kernels_impl.h includes this file after its own kernels, whose helpers (relu) it uses. Argument
// checks, allocation and the GEMMs live in winograd_cpu.cpp.
//
// Winograd's minimal filtering F(4x4, 3x3) (Lavin & Gray 2016): a 3x3 convolution (stride 1, padding 1) computes
// each 4x4 tile of its output from the 6x6 input tile around it as
//     Y = A^T [ sum_c (G g_kc G^T) .* (B^T d_c B) ] A
// where d_c is the input tile of channel c, g_kc the 3x3 filter from c to output channel k, and .* elementwise:
// 36 multiplications per tile, channel pair where the direct convolution takes 144. The sum over c is, for each
// of the 36 positions, one GEMM: V[p] (tiles x C) @ U[p] (C x K) = M[p] (tiles x K). The transforms here make
// U from the weight (once per folded weight in inference, every step in training), V from the input and the
// output from M; they vectorize along channels (output channels for U), which channels_last makes contiguous.
// With interpolation points 0, +-1, +-2 the transforms are exact in small
// integers and powers of two but G's 1/6 and 1/24: in float32 the result differs from a direct convolution by a
// few units in the 6th significant digit (relative to the output's largest value), as cuDNN's Winograd kernels do.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>

#include "kernels.h"

namespace fused_resnet {
namespace {

// B^T applied to a column (or row) of 6 values, in place of the 6x6 matrix product.
template <typename V>
inline void winograd_input_1d(const V (&d)[6], V (&r)[6]) {
  r[0] = V(4) * d[0] - V(5) * d[2] + d[4];
  r[1] = d[3] + d[4] - V(4) * (d[1] + d[2]);
  r[2] = V(4) * (d[1] - d[2]) + d[4] - d[3];
  r[3] = V(2) * (d[3] - d[1]) + d[4] - d[2];
  r[4] = V(2) * (d[1] - d[3]) + d[4] - d[2];
  r[5] = V(4) * d[1] - V(5) * d[3] + d[5];
}

// A^T applied to a column (or row) of 6 values: 4 outputs.
template <typename V>
inline void winograd_output_1d(const V (&m)[6], V (&o)[4]) {
  const V a = m[1] + m[2], b = m[1] - m[2], c = m[3] + m[4], d = m[3] - m[4];
  o[0] = m[0] + a + c;
  o[1] = b + V(2) * d;
  o[2] = a + V(4) * c;
  o[3] = b + V(8) * d + m[5];
}

// input: N x C x H x W dense channels_last; v: 36 x tiles x C, tiles = N * ceil(H/4) * ceil(W/4) in (n, row, column)
// order. Pixels outside the image (the padding, and the last tiles' overhang) are zeros.
void winograd_input_transform(const at::Tensor& input, at::Tensor& v) {
  using Vec = at::vec::Vectorized<float>;
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t tiles_h = (H + kWinogradTile - 1) / kWinogradTile, tiles_w = (W + kWinogradTile - 1) / kWinogradTile;
  const int64_t tiles = winograd_tiles(N, H, W);
  const float* x = input.const_data_ptr<float>();
  float* out = v.data_ptr<float>();
  const int64_t point_stride = tiles * C;  // between the 36 matrices of v
  at::parallel_for(0, tiles, 1, [&](int64_t t_begin, int64_t t_end) {
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t n = t / (tiles_h * tiles_w), th = t / tiles_w % tiles_h, tw = t % tiles_w;
      const int64_t h0 = th * kWinogradTile - 1, w0 = tw * kWinogradTile - 1;
      // Row pointers of the tile's 6x6 window, null outside the image.
      const float* pixel[6][6];
      for (int i = 0; i < 6; ++i) {
        for (int j = 0; j < 6; ++j) {
          const int64_t h = h0 + i, w = w0 + j;
          pixel[i][j] = (h >= 0 && h < H && w >= 0 && w < W) ? x + ((n * H + h) * W + w) * C : nullptr;
        }
      }
      float* dst = out + t * C;
      int64_t c = 0;
      for (; c + Vec::size() <= C; c += Vec::size()) {
        Vec rows[6][6];  // B^T d, column by column
        for (int j = 0; j < 6; ++j) {
          Vec col[6];
          for (int i = 0; i < 6; ++i) col[i] = pixel[i][j] ? Vec::loadu(pixel[i][j] + c) : Vec(0.f);
          Vec r[6];
          winograd_input_1d(col, r);
          for (int i = 0; i < 6; ++i) rows[i][j] = r[i];
        }
        for (int i = 0; i < 6; ++i) {  // (B^T d) B, row by row
          Vec r[6];
          winograd_input_1d(rows[i], r);
          for (int j = 0; j < 6; ++j) r[j].store(dst + (i * 6 + j) * point_stride + c);
        }
      }
      for (; c < C; ++c) {
        float rows[6][6];
        for (int j = 0; j < 6; ++j) {
          float col[6];
          for (int i = 0; i < 6; ++i) col[i] = pixel[i][j] ? pixel[i][j][c] : 0.f;
          float r[6];
          winograd_input_1d(col, r);
          for (int i = 0; i < 6; ++i) rows[i][j] = r[i];
        }
        for (int i = 0; i < 6; ++i) {
          float r[6];
          winograd_input_1d(rows[i], r);
          for (int j = 0; j < 6; ++j) dst[(i * 6 + j) * point_stride + c] = r[j];
        }
      }
    }
  });
}

// m: 36 x tiles x K (the GEMMs' results); out: N x K x H x W dense channels_last, = [relu](A^T m A [+ bias]
// [+ residual]) on the pixels inside the image. bias: undefined or K values; residual: undefined, or dense
// channels_last like out.
void winograd_output_transform(const at::Tensor& m, const at::Tensor& bias, const at::Tensor& residual,
                               bool apply_relu, at::Tensor& out) {
  using Vec = at::vec::Vectorized<float>;
  const int64_t N = out.size(0), K = out.size(1), H = out.size(2), W = out.size(3);
  const int64_t tiles_h = (H + kWinogradTile - 1) / kWinogradTile, tiles_w = (W + kWinogradTile - 1) / kWinogradTile;
  const int64_t tiles = winograd_tiles(N, H, W);
  const float* src = m.const_data_ptr<float>();
  const float* b = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  const float* res = residual.defined() ? residual.const_data_ptr<float>() : nullptr;
  float* y = out.data_ptr<float>();
  const int64_t point_stride = tiles * K;
  at::parallel_for(0, tiles, 1, [&](int64_t t_begin, int64_t t_end) {
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t n = t / (tiles_h * tiles_w), th = t / tiles_w % tiles_h, tw = t % tiles_w;
      const int64_t h0 = th * kWinogradTile, w0 = tw * kWinogradTile;
      const int64_t rows = std::min(kWinogradTile, H - h0), cols = std::min(kWinogradTile, W - w0);
      const float* tile = src + t * K;
      // The element offset of output pixel (i, j) of the tile.
      auto at = [&](int64_t i, int64_t j) { return ((n * H + h0 + i) * W + w0 + j) * K; };
      int64_t k = 0;
      for (; k + Vec::size() <= K; k += Vec::size()) {
        Vec cols4[6][4];  // m A, row by row: cols4[i][j] = (m A)[i][j]
        for (int i = 0; i < 6; ++i) {
          Vec row[6];
          for (int j = 0; j < 6; ++j) row[j] = Vec::loadu(tile + (i * 6 + j) * point_stride + k);
          winograd_output_1d(row, cols4[i]);
        }
        const Vec bias_k = b != nullptr ? Vec::loadu(b + k) : Vec(0.f);
        for (int64_t j = 0; j < cols; ++j) {  // A^T (m A), column by column
          Vec col[6];
          for (int i = 0; i < 6; ++i) col[i] = cols4[i][j];
          Vec o[4];
          winograd_output_1d(col, o);
          for (int64_t i = 0; i < rows; ++i) {
            Vec value = o[i] + bias_k;
            if (res != nullptr) value = value + Vec::loadu(res + at(i, j) + k);
            if (apply_relu) value = relu(value);
            value.store(y + at(i, j) + k);
          }
        }
      }
      for (; k < K; ++k) {
        float cols4[6][4];
        for (int i = 0; i < 6; ++i) {
          float row[6];
          for (int j = 0; j < 6; ++j) row[j] = tile[(i * 6 + j) * point_stride + k];
          winograd_output_1d(row, cols4[i]);
        }
        for (int64_t j = 0; j < cols; ++j) {
          float col[6];
          for (int i = 0; i < 6; ++i) col[i] = cols4[i][j];
          float o[4];
          winograd_output_1d(col, o);
          for (int64_t i = 0; i < rows; ++i) {
            float value = b != nullptr ? o[i] + b[k] : o[i];
            if (res != nullptr) value += res[at(i, j) + k];
            if (apply_relu) value = relu(value);
            y[at(i, j) + k] = value;
          }
        }
      }
    }
  });
}

// G applied to a column (or row) of a 3x3 filter: 6 values.
template <typename V>
inline void winograd_filter_1d(const V (&g)[3], V (&t)[6]) {
  const V sum_odd = g[0] + g[2];
  t[0] = g[0] * V(1.f / 4);
  t[1] = (sum_odd + g[1]) * V(-1.f / 6);
  t[2] = (sum_odd - g[1]) * V(-1.f / 6);
  t[3] = g[0] * V(1.f / 24) + g[1] * V(1.f / 12) + g[2] * V(1.f / 6);
  t[4] = g[0] * V(1.f / 24) - g[1] * V(1.f / 12) + g[2] * V(1.f / 6);
  t[5] = g[2];
}

// filters: 3 x 3 x C x K, the weight permuted so that output channels are contiguous; u: 36 x C x K,
// u[p] = (G g G^T)[p] for each filter g. Vectorized along K: a training step transforms every 3x3 weight twice.
void winograd_weight_transform(const at::Tensor& filters, at::Tensor& u) {
  using Vec = at::vec::Vectorized<float>;
  const int64_t C = filters.size(2), K = filters.size(3);
  const float* w = filters.const_data_ptr<float>();
  float* out = u.data_ptr<float>();
  const int64_t tap_stride = C * K, point_stride = C * K;
  at::parallel_for(0, C, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      const float* src = w + c * K;
      float* dst = out + c * K;
      int64_t k = 0;
      for (; k + Vec::size() <= K; k += Vec::size()) {
        Vec cols[6][3];  // G g, column by column
        for (int j = 0; j < 3; ++j) {
          Vec g[3];
          for (int i = 0; i < 3; ++i) g[i] = Vec::loadu(src + (i * 3 + j) * tap_stride + k);
          Vec t[6];
          winograd_filter_1d(g, t);
          for (int i = 0; i < 6; ++i) cols[i][j] = t[i];
        }
        for (int i = 0; i < 6; ++i) {  // (G g) G^T, row by row
          Vec t[6];
          winograd_filter_1d(cols[i], t);
          for (int j = 0; j < 6; ++j) t[j].store(dst + (i * 6 + j) * point_stride + k);
        }
      }
      for (; k < K; ++k) {
        float cols[6][3];
        for (int j = 0; j < 3; ++j) {
          float g[3];
          for (int i = 0; i < 3; ++i) g[i] = src[(i * 3 + j) * tap_stride + k];
          float t[6];
          winograd_filter_1d(g, t);
          for (int i = 0; i < 6; ++i) cols[i][j] = t[i];
        }
        for (int i = 0; i < 6; ++i) {
          float t[6];
          winograd_filter_1d(cols[i], t);
          for (int j = 0; j < 6; ++j) dst[(i * 6 + j) * point_stride + k] = t[j];
        }
      }
    }
  });
}

// The weight gradient by the same algorithm, transposed: dW = G^T [ sum_tiles (A dY A^T) .* (B^T d B) ] G, the sum
// over tiles for each of the 36 positions one GEMM, V[p]^T (C x tiles) @ Z[p] (tiles x K).

// A applied to a column (or row) of 4 output-gradient values: 6 values.
template <typename V>
inline void winograd_grad_1d(const V (&g)[4], V (&z)[6]) {
  const V even = g[0] + g[2], odd = g[1] + g[3], even4 = g[0] + V(4) * g[2], odd2 = V(2) * g[1] + V(8) * g[3];
  z[0] = g[0];
  z[1] = even + odd;
  z[2] = even - odd;
  z[3] = even4 + odd2;
  z[4] = even4 - odd2;
  z[5] = g[3];
}

// grad: N x K x H x W dense channels_last (the output gradient); z: 36 x tiles x K, tiles as in
// winograd_input_transform. Pixels past the image's last row and column are zeros.
void winograd_grad_output_transform(const at::Tensor& grad, at::Tensor& z) {
  using Vec = at::vec::Vectorized<float>;
  const int64_t N = grad.size(0), K = grad.size(1), H = grad.size(2), W = grad.size(3);
  const int64_t tiles_h = (H + kWinogradTile - 1) / kWinogradTile, tiles_w = (W + kWinogradTile - 1) / kWinogradTile;
  const int64_t tiles = winograd_tiles(N, H, W);
  const float* g = grad.const_data_ptr<float>();
  float* out = z.data_ptr<float>();
  const int64_t point_stride = tiles * K;
  at::parallel_for(0, tiles, 1, [&](int64_t t_begin, int64_t t_end) {
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t n = t / (tiles_h * tiles_w), th = t / tiles_w % tiles_h, tw = t % tiles_w;
      const int64_t h0 = th * kWinogradTile, w0 = tw * kWinogradTile;
      const float* pixel[4][4];
      for (int i = 0; i < 4; ++i) {
        for (int j = 0; j < 4; ++j) {
          const int64_t h = h0 + i, w = w0 + j;
          pixel[i][j] = (h < H && w < W) ? g + ((n * H + h) * W + w) * K : nullptr;
        }
      }
      float* dst = out + t * K;
      int64_t k = 0;
      for (; k + Vec::size() <= K; k += Vec::size()) {
        Vec rows[6][4];  // A g, column by column
        for (int j = 0; j < 4; ++j) {
          Vec col[4];
          for (int i = 0; i < 4; ++i) col[i] = pixel[i][j] ? Vec::loadu(pixel[i][j] + k) : Vec(0.f);
          Vec r[6];
          winograd_grad_1d(col, r);
          for (int i = 0; i < 6; ++i) rows[i][j] = r[i];
        }
        for (int i = 0; i < 6; ++i) {  // (A g) A^T, row by row
          Vec r[6];
          winograd_grad_1d(rows[i], r);
          for (int j = 0; j < 6; ++j) r[j].store(dst + (i * 6 + j) * point_stride + k);
        }
      }
      for (; k < K; ++k) {
        float rows[6][4];
        for (int j = 0; j < 4; ++j) {
          float col[4];
          for (int i = 0; i < 4; ++i) col[i] = pixel[i][j] ? pixel[i][j][k] : 0.f;
          float r[6];
          winograd_grad_1d(col, r);
          for (int i = 0; i < 6; ++i) rows[i][j] = r[i];
        }
        for (int i = 0; i < 6; ++i) {
          float r[6];
          winograd_grad_1d(rows[i], r);
          for (int j = 0; j < 6; ++j) dst[(i * 6 + j) * point_stride + k] = r[j];
        }
      }
    }
  });
}

// G^T applied to a column (or row) of 6 values: 3 values.
template <typename V>
inline void winograd_filter_grad_1d(const V (&u)[6], V (&s)[3]) {
  const V plus = u[1] + u[2], minus = u[2] - u[1], plus34 = u[3] + u[4], minus34 = u[3] - u[4];
  s[0] = u[0] * V(1.f / 4) - plus * V(1.f / 6) + plus34 * V(1.f / 24);
  s[1] = minus * V(1.f / 6) + minus34 * V(1.f / 12);
  s[2] = (plus34 - plus) * V(1.f / 6) + u[5];
}

// du: 36 x C x K (the GEMMs' results); grad_filters: 3 x 3 x C x K, = G^T du G for each (c, k).
void winograd_weight_grad_transform(const at::Tensor& du, at::Tensor& grad_filters) {
  using Vec = at::vec::Vectorized<float>;
  const int64_t C = du.size(1), K = du.size(2);
  const float* src = du.const_data_ptr<float>();
  float* out = grad_filters.data_ptr<float>();
  const int64_t stride = C * K;  // between the 36 points of du, and between the 9 taps of grad_filters
  at::parallel_for(0, C, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      const float* u = src + c * K;
      float* dst = out + c * K;
      int64_t k = 0;
      for (; k + Vec::size() <= K; k += Vec::size()) {
        Vec cols[3][6];  // G^T u, column by column
        for (int j = 0; j < 6; ++j) {
          Vec col[6];
          for (int i = 0; i < 6; ++i) col[i] = Vec::loadu(u + (i * 6 + j) * stride + k);
          Vec r[3];
          winograd_filter_grad_1d(col, r);
          for (int i = 0; i < 3; ++i) cols[i][j] = r[i];
        }
        for (int i = 0; i < 3; ++i) {  // (G^T u) G, row by row
          Vec r[3];
          winograd_filter_grad_1d(cols[i], r);
          for (int j = 0; j < 3; ++j) r[j].store(dst + (i * 3 + j) * stride + k);
        }
      }
      for (; k < K; ++k) {
        float cols[3][6];
        for (int j = 0; j < 6; ++j) {
          float col[6];
          for (int i = 0; i < 6; ++i) col[i] = u[(i * 6 + j) * stride + k];
          float r[3];
          winograd_filter_grad_1d(col, r);
          for (int i = 0; i < 3; ++i) cols[i][j] = r[i];
        }
        for (int i = 0; i < 3; ++i) {
          float r[3];
          winograd_filter_grad_1d(cols[i], r);
          for (int j = 0; j < 3; ++j) dst[(i * 3 + j) * stride + k] = r[j];
        }
      }
    }
  });
}

}  // namespace
}  // namespace fused_resnet
