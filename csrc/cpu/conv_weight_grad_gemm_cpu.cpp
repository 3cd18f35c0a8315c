// CPU implementation of conv_weight_grad_gemm: a convolution's weight gradient as one GEMM over every output pixel,
// grad_weight[k, j] = sum over pixels p of grad_output[p, k] * col[p, j], with col the input's patches (im2col), made
// here in pieces of a few images each so that the patch matrix stays a few MB, each piece's product accumulated by
// at::addmm_ (MKL's GEMM).
//
// Why: oneDNN's direct weight gradient runs far below the machine's GEMM speed where the images are small and the
// channels many (on a 2-core AVX-512 Xeon, ResNet's 512-channel 3x3 layer at 4x4 pixels, batch 4: 7.5 ms against
// 1.2 ms for the GEMM here). Python chooses between the two per configuration by timing both (kernels/native.py).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

namespace fused_resnet {

namespace {

// Bytes of patch matrix per piece: few enough images per piece that the patches of ResNet's largest layers do not
// double the step's memory (a batch of 256 at 224x224 would need 1.8 GB at once), enough output pixels per piece
// that each GEMM's inner dimension is long (a 4 MB piece of a 3x3 layer of 64 channels holds 1,800 pixels).
constexpr int64_t kPieceBytes = int64_t{16} << 20;

struct Geometry {
  int64_t channels, height, width, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
      out_h, out_w;
};

// Channels_last patches of images [first, first + count): col[(image, oh, ow), (kh, kw, c)], each (kh, kw) block a
// copy of one input pixel's channels or zeros in the padding.
template <typename scalar_t>
void im2col_channels_last(const scalar_t* input, const Geometry& g, int64_t first, int64_t count, scalar_t* col) {
  const int64_t row_length = g.kernel_h * g.kernel_w * g.channels;
  at::parallel_for(0, count * g.out_h * g.out_w, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t ow = row % g.out_w, oh = (row / g.out_w) % g.out_h, image = first + row / (g.out_w * g.out_h);
      scalar_t* out = col + row * row_length;
      for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
        const int64_t ih = oh * g.stride_h - g.pad_h + kh * g.dilation_h;
        for (int64_t kw = 0; kw < g.kernel_w; ++kw, out += g.channels) {
          const int64_t iw = ow * g.stride_w - g.pad_w + kw * g.dilation_w;
          if (ih < 0 || ih >= g.height || iw < 0 || iw >= g.width) {
            std::fill(out, out + g.channels, scalar_t(0));
          } else {
            std::memcpy(out, input + ((image * g.height + ih) * g.width + iw) * g.channels,
                        g.channels * sizeof(scalar_t));
          }
        }
      }
    }
  });
}

int64_t ceil_div(int64_t a, int64_t b) { return a >= 0 ? (a + b - 1) / b : -((-a) / b); }

// Contiguous (NCHW) patches of images [first, first + count): col[(c, kh, kw), (image, oh, ow)], each row the input
// channel c shifted by (kh, kw) and sampled at the stride, zeros in the padding: per output line, the columns whose
// input lies inside the image, [ow_begin, ow_end), are one copy (a memcpy at stride 1), the others zeros.
template <typename scalar_t>
void im2col_contiguous(const scalar_t* input, const Geometry& g, int64_t first, int64_t count, scalar_t* col) {
  const int64_t row_length = count * g.out_h * g.out_w;
  at::parallel_for(0, g.channels * g.kernel_h * g.kernel_w, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t kw = row % g.kernel_w, kh = (row / g.kernel_w) % g.kernel_h, c = row / (g.kernel_w * g.kernel_h);
      // iw = ow * stride_w + offset lies in [0, width) for ow in [ow_begin, ow_end)
      const int64_t offset = kw * g.dilation_w - g.pad_w;
      const int64_t ow_begin = std::clamp<int64_t>(ceil_div(-offset, g.stride_w), 0, g.out_w);
      const int64_t ow_end = std::clamp<int64_t>(ceil_div(g.width - offset, g.stride_w), ow_begin, g.out_w);
      scalar_t* out = col + row * row_length;
      for (int64_t image = first; image < first + count; ++image) {
        const scalar_t* plane = input + (image * g.channels + c) * g.height * g.width;
        for (int64_t oh = 0; oh < g.out_h; ++oh, out += g.out_w) {
          const int64_t ih = oh * g.stride_h - g.pad_h + kh * g.dilation_h;
          if (ih < 0 || ih >= g.height) {
            std::fill(out, out + g.out_w, scalar_t(0));
            continue;
          }
          const scalar_t* line = plane + ih * g.width;
          std::fill(out, out + ow_begin, scalar_t(0));
          if (g.stride_w == 1) {
            std::memcpy(out + ow_begin, line + ow_begin + offset, (ow_end - ow_begin) * sizeof(scalar_t));
          } else {
            for (int64_t ow = ow_begin; ow < ow_end; ++ow) {
              out[ow] = line[ow * g.stride_w + offset];
            }
          }
          std::fill(out + ow_end, out + g.out_w, scalar_t(0));
        }
      }
    }
  });
}

// The NCHW output gradient of images [first, first + count) as the GEMM's (K, count * pixels) operand: each
// channel's planes side by side. Packed here, as oneDNN reorders NCHW operands inside its own convolutions.
template <typename scalar_t>
void pack_grad_contiguous(const scalar_t* grad, int64_t channels, int64_t pixels, int64_t first, int64_t count,
                          scalar_t* out) {
  at::parallel_for(0, channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      for (int64_t image = 0; image < count; ++image) {
        std::memcpy(out + (k * count + image) * pixels, grad + ((first + image) * channels + k) * pixels,
                    pixels * sizeof(scalar_t));
      }
    }
  });
}

int64_t pair_item(const char* op, const char* name, at::IntArrayRef values, int64_t index, int64_t minimum) {
  TORCH_CHECK(values.size() == 2, "fused_resnet::", op, ": expected ", name, " of 2 values, got ", values);
  TORCH_CHECK(values[index] >= minimum, "fused_resnet::", op, ": expected ", name, " values >= ", minimum, ", got ",
              values);
  return values[index];
}

at::Tensor conv_weight_grad_gemm_cpu(const at::Tensor& input_, const at::Tensor& grad_output_,
                                     at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation) {
  const char* op = "conv_weight_grad_gemm";
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"input", input_},
                                std::pair<const char*, const at::Tensor&>{"grad_output", grad_output_}}) {
    TORCH_CHECK(t.device().is_cpu(), "fused_resnet::", op, ": expected ", name, " on the CPU, got ", t.device());
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "fused_resnet::", op, ": expected ",
                name, " of dtype float32 or float64, got ", t.scalar_type());
    TORCH_CHECK(t.dim() == 4, "fused_resnet::", op, ": expected ", name, " to be 4-D (N, C, H, W), got shape ",
                t.sizes());
  }
  TORCH_CHECK(grad_output_.scalar_type() == input_.scalar_type(), "fused_resnet::", op,
              ": expected grad_output of the input's dtype ", input_.scalar_type(), ", got ",
              grad_output_.scalar_type());
  Geometry g{input_.size(1),
             input_.size(2),
             input_.size(3),
             pair_item(op, "kernel_size", kernel_size, 0, 1),
             pair_item(op, "kernel_size", kernel_size, 1, 1),
             pair_item(op, "stride", stride, 0, 1),
             pair_item(op, "stride", stride, 1, 1),
             pair_item(op, "padding", padding, 0, 0),
             pair_item(op, "padding", padding, 1, 0),
             pair_item(op, "dilation", dilation, 0, 1),
             pair_item(op, "dilation", dilation, 1, 1),
             0,
             0};
  g.out_h = (g.height + 2 * g.pad_h - g.dilation_h * (g.kernel_h - 1) - 1) / g.stride_h + 1;
  g.out_w = (g.width + 2 * g.pad_w - g.dilation_w * (g.kernel_w - 1) - 1) / g.stride_w + 1;
  const int64_t images = input_.size(0), out_channels = grad_output_.size(1);
  TORCH_CHECK(g.out_h > 0 && g.out_w > 0, "fused_resnet::", op, ": the input ", input_.sizes(),
              " is smaller than the kernel ", kernel_size, " with padding ", padding, " and dilation ", dilation);
  TORCH_CHECK(grad_output_.size(0) == images && grad_output_.size(2) == g.out_h && grad_output_.size(3) == g.out_w,
              "fused_resnet::", op, ": expected grad_output of shape [", images, ", K, ", g.out_h, ", ", g.out_w,
              "] (the convolution's output), got ", grad_output_.sizes());

  // The input's layout decides the patches' and so the gradient's: channels_last input, a channels_last weight
  // gradient (K, kh, kw, C in memory); else a contiguous one (K, C, kh, kw).
  const bool channels_last = input_.is_contiguous(at::MemoryFormat::ChannelsLast) && !input_.is_contiguous();
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor input = input_.contiguous(format);
  const at::Tensor grad_output = grad_output_.contiguous(format);
  const int64_t patch = g.channels * g.kernel_h * g.kernel_w, pixels = g.out_h * g.out_w;
  at::Tensor grad_weight = at::empty({out_channels, patch}, input.options());
  if (images == 0) {
    grad_weight.zero_();
  }
  const int64_t piece_images =
      std::max<int64_t>(1, kPieceBytes / std::max<int64_t>(1, pixels * patch * input.element_size()));
  for (int64_t first = 0; first < images; first += piece_images) {
    const int64_t count = std::min(piece_images, images - first);
    at::Tensor col, grad_rows;
    if (channels_last) {
      col = at::empty({count * pixels, patch}, input.options());
      AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv_weight_grad_gemm", [&] {
        im2col_channels_last(input.const_data_ptr<scalar_t>(), g, first, count, col.mutable_data_ptr<scalar_t>());
      });
      // (count * pixels, K) rows of the channels_last gradient, transposed: a view.
      grad_rows = grad_output.narrow(0, first, count).permute({0, 2, 3, 1}).reshape({count * pixels, out_channels}).t();
    } else {
      col = at::empty({patch, count * pixels}, input.options()).t();
      AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv_weight_grad_gemm", [&] {
        im2col_contiguous(input.const_data_ptr<scalar_t>(), g, first, count, col.mutable_data_ptr<scalar_t>());
      });
      grad_rows = at::empty({out_channels, count * pixels}, input.options());
      AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv_weight_grad_gemm", [&] {
        pack_grad_contiguous(grad_output.const_data_ptr<scalar_t>(), out_channels, pixels, first, count,
                             grad_rows.mutable_data_ptr<scalar_t>());
      });
    }
    if (first == 0) {
      at::mm_out(grad_weight, grad_rows, col);
    } else {
      grad_weight.addmm_(grad_rows, col);
    }
  }
  if (channels_last) {
    return grad_weight.view({out_channels, g.kernel_h, g.kernel_w, g.channels}).permute({0, 3, 1, 2});
  }
  return grad_weight.view({out_channels, g.channels, g.kernel_h, g.kernel_w});
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) { m.impl("conv_weight_grad_gemm", &conv_weight_grad_gemm_cpu); }

}  // namespace fused_resnet
