// CPU implementations of conv_gemm, conv_input_grad_gemm and conv_weight_grad_gemm: a convolution, its input gradient
// and its weight gradient each as one GEMM over every output pixel with the input's patches (im2col), MKL's GEMM by
// at::mm. The patches are made in pieces of a few images each, so that they stay a few MB:
//   forward        out[p, k]     = sum_j col[p, j] * weight[k, j]
//   input grad     grad_col[p, j] = sum_k grad_output[p, k] * weight[k, j], then summed back onto the pixels (col2im)
//   weight grad    grad_weight[k, j] = sum_p grad_output[p, k] * col[p, j], accumulated over the pieces
// with p an output pixel (image, oh, ow), j a patch element and k an output channel. The input's (for the input
// gradient, the output gradient's) layout decides the activations' and the patches' layout; the weight's layout
// decides the order of a channels_last patch's elements (PatchOrder), so that the weight is the GEMM's operand as it
// is, never copied: an NCHW model trains with channels_last activations inside (models.py, enter_blocks) and keeps
// its NCHW parameters and gradients.
//
// Why: oneDNN's direct convolutions run far below the machine's GEMM speed where the images are small and the
// channels many. On a 2-core AVX-512 Xeon, ResNet's 512-channel 3x3 layer at 4x4 pixels, batch 4, channels_last:
// forward 2.2 ms, input gradient 2.5, weight gradient 8.9, against 1.3-1.4 ms for each GEMM. They lose on large images
// with few channels, so Python chooses per configuration by timing both (kernels/native.py).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <utility>
#include <vector>

namespace fused_resnet {

namespace {

// Bytes of patch matrix per piece: few enough images per piece that the patches of ResNet's largest layers do not
// double the step's memory (a batch of 256 at 224x224 would need 1.8 GB at once), enough output pixels per piece
// that each GEMM is long (a piece of a 3x3 layer of 64 channels holds 7,000 pixels).
constexpr int64_t kPieceBytes = int64_t{16} << 20;

struct Geometry {
  int64_t images, channels, height, width, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
      dilation_w, out_h, out_w;

  int64_t patch() const { return channels * kernel_h * kernel_w; }
  int64_t pixels() const { return out_h * out_w; }
  // A 1x1 convolution with stride 1 and no padding: its channels_last patches are the input itself.
  bool pointwise() const {
    return kernel_h == 1 && kernel_w == 1 && stride_h == 1 && stride_w == 1 && pad_h == 0 && pad_w == 0;
  }
  // Images per piece: patches of at most kPieceBytes, at least one image.
  int64_t piece_images(int64_t element_size) const {
    return std::max<int64_t>(1, kPieceBytes / std::max<int64_t>(1, pixels() * patch() * element_size));
  }
};

// The order of a patch's elements j: (kh, kw, c), a channels_last weight's order, or (c, kh, kw), an NCHW weight's.
// NCHW activations always have (c, kh, kw) patches (each row one channel's shifted image, im2col_contiguous).
enum class PatchOrder { kKernelMajor, kChannelMajor };

// Where element (kh, kw, c) of a channels_last patch lies: tap (kh, kw) * tap_step + c * channel_step.
struct PatchSteps {
  int64_t tap_step, channel_step;
  PatchSteps(const Geometry& g, PatchOrder order)
      : tap_step(order == PatchOrder::kKernelMajor ? g.channels : 1),
        channel_step(order == PatchOrder::kKernelMajor ? 1 : g.kernel_h * g.kernel_w) {}
};

int64_t ceil_div(int64_t a, int64_t b) { return a >= 0 ? (a + b - 1) / b : -((-a) / b); }

// The output columns ow whose input column ow * stride_w + offset lies inside the image: [begin, end).
std::pair<int64_t, int64_t> inside_columns(const Geometry& g, int64_t offset) {
  const int64_t begin = std::clamp<int64_t>(ceil_div(-offset, g.stride_w), 0, g.out_w);
  return {begin, std::clamp<int64_t>(ceil_div(g.width - offset, g.stride_w), begin, g.out_w)};
}

// Channels_last patches of images [first, first + count): col[(image, oh, ow), j], tap (kh, kw) of each patch one
// input pixel's channels, or zeros in the padding. PatchOrder::kKernelMajor copies each tap's channels as one block;
// kChannelMajor interleaves the taps channel by channel, writing the row in order from kh * kw read streams (writing
// each tap's channels at a stride of kh * kw instead took 1.5x as long: 64 channels at 40x40, batch 16).
template <typename scalar_t>
void im2col_channels_last(const scalar_t* input, const Geometry& g, int64_t first, int64_t count, PatchOrder order,
                          scalar_t* col) {
  const int64_t row_length = g.patch(), taps = g.kernel_h * g.kernel_w;
  const std::vector<scalar_t> zeros(g.channels, scalar_t(0));  // a padding pixel's channels
  at::parallel_for(0, count * g.pixels(), 16, [&](int64_t begin, int64_t end) {
    std::vector<const scalar_t*> sources(taps);  // each tap's input pixel
    for (int64_t row = begin; row < end; ++row) {
      const int64_t ow = row % g.out_w, oh = (row / g.out_w) % g.out_h, image = first + row / g.pixels();
      for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
        const int64_t ih = oh * g.stride_h - g.pad_h + kh * g.dilation_h;
        for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
          const int64_t iw = ow * g.stride_w - g.pad_w + kw * g.dilation_w;
          const bool inside = ih >= 0 && ih < g.height && iw >= 0 && iw < g.width;
          sources[kh * g.kernel_w + kw] =
              inside ? input + ((image * g.height + ih) * g.width + iw) * g.channels : zeros.data();
        }
      }
      scalar_t* out = col + row * row_length;
      if (order == PatchOrder::kKernelMajor) {
        for (int64_t t = 0; t < taps; ++t) {
          std::memcpy(out + t * g.channels, sources[t], g.channels * sizeof(scalar_t));
        }
      } else {
        for (int64_t c = 0; c < g.channels; ++c) {
          for (int64_t t = 0; t < taps; ++t) {
            *out++ = sources[t][c];
          }
        }
      }
    }
  });
}

// The input gradient of images [first, first + count), channels_last, from grad_col[(image, oh, ow), j] (patches in
// `order`): each input pixel gathers the patch entries that read it (no two threads write one pixel).
template <typename scalar_t>
void col2im_channels_last(const scalar_t* grad_col, const Geometry& g, int64_t first, int64_t count, PatchOrder order,
                          scalar_t* grad_input) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row_length = g.patch();
  const PatchSteps steps(g, order);
  at::parallel_for(0, count * g.height * g.width, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(g.channels);
    for (int64_t pixel = begin; pixel < end; ++pixel) {
      const int64_t iw = pixel % g.width, ih = (pixel / g.width) % g.height, image = pixel / (g.height * g.width);
      std::fill(sum.begin(), sum.end(), acc_t(0));
      for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
        const int64_t th = ih + g.pad_h - kh * g.dilation_h;
        if (th < 0 || th % g.stride_h != 0 || th / g.stride_h >= g.out_h) {
          continue;
        }
        for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
          const int64_t tw = iw + g.pad_w - kw * g.dilation_w;
          if (tw < 0 || tw % g.stride_w != 0 || tw / g.stride_w >= g.out_w) {
            continue;
          }
          const int64_t row = (image * g.out_h + th / g.stride_h) * g.out_w + tw / g.stride_w;
          const scalar_t* in = grad_col + row * row_length + (kh * g.kernel_w + kw) * steps.tap_step;
          for (int64_t c = 0; c < g.channels; ++c) {
            sum[c] += static_cast<acc_t>(in[c * steps.channel_step]);
          }
        }
      }
      scalar_t* out = grad_input + ((first + image) * g.height * g.width + ih * g.width + iw) * g.channels;
      std::copy(sum.begin(), sum.end(), out);
    }
  });
}

// Contiguous (NCHW) patches of images [first, first + count): col[(c, kh, kw), (image, oh, ow)], each row the input
// channel c shifted by (kh, kw) and sampled at the stride, zeros in the padding: per output line, the columns whose
// input lies inside the image are one copy (a memcpy at stride 1), the others zeros.
template <typename scalar_t>
void im2col_contiguous(const scalar_t* input, const Geometry& g, int64_t first, int64_t count, scalar_t* col) {
  const int64_t row_length = count * g.pixels();
  at::parallel_for(0, g.patch(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t kw = row % g.kernel_w, kh = (row / g.kernel_w) % g.kernel_h, c = row / (g.kernel_w * g.kernel_h);
      const int64_t offset = kw * g.dilation_w - g.pad_w;
      const auto [ow_begin, ow_end] = inside_columns(g, offset);
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

// The input gradient of images [first, first + count), NCHW, from grad_col[(c, kh, kw), (image, oh, ow)]: each
// channel's rows summed back onto its planes, im2col_contiguous's reads turned into additions (a thread owns whole
// channels, so no two write one element).
template <typename scalar_t>
void col2im_contiguous(const scalar_t* grad_col, const Geometry& g, int64_t first, int64_t count,
                       scalar_t* grad_input) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row_length = count * g.pixels(), plane_size = g.height * g.width;
  at::parallel_for(0, g.channels, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sums(count * plane_size);  // the channel's planes of the piece's images
    for (int64_t c = begin; c < end; ++c) {
      std::fill(sums.begin(), sums.end(), acc_t(0));
      for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
        for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
          const int64_t offset = kw * g.dilation_w - g.pad_w;
          const auto [ow_begin, ow_end] = inside_columns(g, offset);
          const scalar_t* in = grad_col + ((c * g.kernel_h + kh) * g.kernel_w + kw) * row_length;
          for (int64_t image = 0; image < count; ++image) {
            acc_t* plane = sums.data() + image * plane_size;
            for (int64_t oh = 0; oh < g.out_h; ++oh, in += g.out_w) {
              const int64_t ih = oh * g.stride_h - g.pad_h + kh * g.dilation_h;
              if (ih < 0 || ih >= g.height) {
                continue;
              }
              acc_t* line = plane + ih * g.width;
              for (int64_t ow = ow_begin; ow < ow_end; ++ow) {
                line[ow * g.stride_w + offset] += static_cast<acc_t>(in[ow]);
              }
            }
          }
        }
      }
      for (int64_t image = 0; image < count; ++image) {
        std::copy(sums.begin() + image * plane_size, sums.begin() + (image + 1) * plane_size,
                  grad_input + ((first + image) * g.channels + c) * plane_size);
      }
    }
  });
}

// The GEMM's operands and results, viewed or laid out.

// A channels_last tensor's images [first, first + count) as a (count * pixels, channels) matrix: a view.
at::Tensor pixel_rows(const at::Tensor& t, int64_t first, int64_t count) {
  return t.narrow(0, first, count).permute({0, 2, 3, 1}).view({-1, t.size(1)});
}

// An NCHW tensor's images [first, first + count) as a (channels, count * pixels) matrix, each channel's planes side
// by side (a GEMM operand); unpack_channels writes such a matrix (a GEMM's result) back into the images. Done here,
// as oneDNN reorders NCHW operands inside its own convolutions.
template <typename scalar_t>
void pack_channels(const scalar_t* images, int64_t channels, int64_t pixels, int64_t first, int64_t count,
                   scalar_t* matrix) {
  at::parallel_for(0, channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      for (int64_t image = 0; image < count; ++image) {
        std::memcpy(matrix + (k * count + image) * pixels, images + ((first + image) * channels + k) * pixels,
                    pixels * sizeof(scalar_t));
      }
    }
  });
}

template <typename scalar_t>
void unpack_channels(const scalar_t* matrix, int64_t channels, int64_t pixels, int64_t first, int64_t count,
                     scalar_t* images) {
  at::parallel_for(0, channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      for (int64_t image = 0; image < count; ++image) {
        std::memcpy(images + ((first + image) * channels + k) * pixels, matrix + (k * count + image) * pixels,
                    pixels * sizeof(scalar_t));
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Arguments

void check_operand(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), "fused_resnet::", op, ": expected ", name, " on the CPU, got ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "fused_resnet::", op, ": expected ", name,
              " of a floating-point dtype (float32, float64, bfloat16 or float16), got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == dtype, "fused_resnet::", op, ": expected ", name, " of the same dtype as the first ",
              "argument, ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 4, "fused_resnet::", op, ": expected ", name, " to be 4-D, got shape ", t.sizes());
}

int64_t pair_item(const char* op, const char* name, at::IntArrayRef values, int64_t index, int64_t minimum) {
  TORCH_CHECK(values.size() == 2, "fused_resnet::", op, ": expected ", name, " of 2 values, got ", values);
  TORCH_CHECK(values[index] >= minimum, "fused_resnet::", op, ": expected ", name, " values >= ", minimum, ", got ",
              values);
  return values[index];
}

// The geometry of a convolution of an input shaped `input_size` (N, C, H, W) with a kernel of `kernel_size`.
Geometry geometry_of(const char* op, at::IntArrayRef input_size, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation) {
  Geometry g{input_size[0],
             input_size[1],
             input_size[2],
             input_size[3],
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
  TORCH_CHECK(g.out_h > 0 && g.out_w > 0, "fused_resnet::", op, ": the input ", input_size,
              " is smaller than the kernel ", kernel_size, " with padding ", padding, " and dilation ", dilation);
  return g;
}

// Strictly channels_last (a tensor that is NCHW too, one channel or 1x1 pixels, counts as NCHW, as everywhere in
// the extension).
at::MemoryFormat layout_of(const at::Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous() ? at::MemoryFormat::ChannelsLast
                                                                              : at::MemoryFormat::Contiguous;
}

// The patch order of a convolution with activations in `format` and a weight laid out as `weight_format`: the
// weight's own where the activations are channels_last (a 1x1 weight is both), else NCHW's.
PatchOrder patch_order(at::MemoryFormat format, at::MemoryFormat weight_format) {
  return format == at::MemoryFormat::ChannelsLast && weight_format == at::MemoryFormat::ChannelsLast
             ? PatchOrder::kKernelMajor
             : PatchOrder::kChannelMajor;
}

// A weight's layout, as patch_order takes it: channels_last when it is dense channels_last (a 1x1 weight, dense in
// both, counts as channels_last, its one order serving either).
at::MemoryFormat weight_layout_of(const at::Tensor& weight) {
  return weight.is_contiguous(at::MemoryFormat::ChannelsLast) ? at::MemoryFormat::ChannelsLast
                                                              : at::MemoryFormat::Contiguous;
}

// The weight as the GEMM's (K, patch) matrix, its columns in `order`: a view of a weight laid out in that order.
at::Tensor weight_matrix(const at::Tensor& weight, PatchOrder order) {
  if (order == PatchOrder::kKernelMajor) {
    return weight.contiguous(at::MemoryFormat::ChannelsLast).permute({0, 2, 3, 1}).reshape({weight.size(0), -1});
  }
  return weight.contiguous().view({weight.size(0), -1});
}

// ---------------------------------------------------------------------------------------------------------------
// Ops

at::Tensor conv_gemm_cpu(const at::Tensor& input_, const at::Tensor& weight_, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation) {
  const char* op = "conv_gemm";
  check_operand(op, "input", input_, input_.scalar_type());
  check_operand(op, "weight", weight_, input_.scalar_type());
  TORCH_CHECK(weight_.size(1) == input_.size(1), "fused_resnet::", op, ": expected weight of shape (K, ",
              input_.size(1), ", kh, kw) for the input's ", input_.size(1), " channels, got ", weight_.sizes());
  const Geometry g = geometry_of(op, input_.sizes(), weight_.sizes().slice(2), stride, padding, dilation);
  const auto format = layout_of(input_);
  const at::Tensor input = input_.contiguous(format);
  const PatchOrder order = patch_order(format, weight_layout_of(weight_));
  const at::Tensor weight = weight_matrix(weight_, order);
  const int64_t out_channels = weight.size(0), pixels = g.pixels();
  at::Tensor output = at::empty({g.images, out_channels, g.out_h, g.out_w}, input.options().memory_format(format));
  const int64_t piece = g.piece_images(input.element_size());
  for (int64_t first = 0; first < g.images; first += piece) {
    const int64_t count = std::min(piece, g.images - first);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "conv_gemm", [&] {
      if (format == at::MemoryFormat::ChannelsLast) {
        // output rows (image, oh, ow) x K: a view of the channels_last output
        at::Tensor rows = pixel_rows(output, first, count);
        at::Tensor col;
        if (g.pointwise()) {
          col = pixel_rows(input, first, count);
        } else {
          col = at::empty({count * pixels, g.patch()}, input.options());
          im2col_channels_last(input.const_data_ptr<scalar_t>(), g, first, count, order,
                               col.mutable_data_ptr<scalar_t>());
        }
        at::mm_out(rows, col, weight.t());
      } else {
        at::Tensor col = at::empty({g.patch(), count * pixels}, input.options());
        im2col_contiguous(input.const_data_ptr<scalar_t>(), g, first, count, col.mutable_data_ptr<scalar_t>());
        if (count == 1) {
          at::Tensor plane = output.select(0, first).view({out_channels, pixels});
          at::mm_out(plane, weight, col);
        } else {
          const at::Tensor packed = at::mm(weight, col);
          unpack_channels(packed.const_data_ptr<scalar_t>(), out_channels, pixels, first, count,
                          output.mutable_data_ptr<scalar_t>());
        }
      }
    });
  }
  return output;
}

at::Tensor conv_input_grad_gemm_cpu(const at::Tensor& grad_output_, const at::Tensor& weight_,
                                    at::IntArrayRef input_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation) {
  const char* op = "conv_input_grad_gemm";
  check_operand(op, "grad_output", grad_output_, grad_output_.scalar_type());
  check_operand(op, "weight", weight_, grad_output_.scalar_type());
  TORCH_CHECK(input_size.size() == 4 && input_size[1] == weight_.size(1), "fused_resnet::", op,
              ": expected input_size (N, ", weight_.size(1), ", H, W) for the weight's ", weight_.size(1),
              " input channels, got ", input_size);
  const Geometry g = geometry_of(op, input_size, weight_.sizes().slice(2), stride, padding, dilation);
  const int64_t out_channels = weight_.size(0), pixels = g.pixels();
  TORCH_CHECK(grad_output_.sizes() == at::IntArrayRef({g.images, out_channels, g.out_h, g.out_w}), "fused_resnet::",
              op, ": expected grad_output of shape [", g.images, ", ", out_channels, ", ", g.out_h, ", ", g.out_w,
              "] (the convolution's output), got ", grad_output_.sizes());
  const auto format = layout_of(grad_output_);
  const at::Tensor grad_output = grad_output_.contiguous(format);
  const PatchOrder order = patch_order(format, weight_layout_of(weight_));
  const at::Tensor weight = weight_matrix(weight_, order);
  at::Tensor grad_input =
      at::empty({g.images, g.channels, g.height, g.width}, grad_output.options().memory_format(format));
  const int64_t piece = g.piece_images(grad_output.element_size());
  for (int64_t first = 0; first < g.images; first += piece) {
    const int64_t count = std::min(piece, g.images - first);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_output.scalar_type(), "conv_input_grad_gemm", [&] {
      if (format == at::MemoryFormat::ChannelsLast) {
        const at::Tensor rows = pixel_rows(grad_output, first, count);
        if (g.pointwise()) {
          at::Tensor grad_rows = pixel_rows(grad_input, first, count);
          at::mm_out(grad_rows, rows, weight);
        } else {
          const at::Tensor grad_col = at::mm(rows, weight);
          col2im_channels_last(grad_col.const_data_ptr<scalar_t>(), g, first, count, order,
                               grad_input.mutable_data_ptr<scalar_t>());
        }
      } else {
        at::Tensor packed = at::empty({out_channels, count * pixels}, grad_output.options());
        pack_channels(grad_output.const_data_ptr<scalar_t>(), out_channels, pixels, first, count,
                      packed.mutable_data_ptr<scalar_t>());
        const at::Tensor grad_col = at::mm(weight.t(), packed);
        col2im_contiguous(grad_col.const_data_ptr<scalar_t>(), g, first, count,
                          grad_input.mutable_data_ptr<scalar_t>());
      }
    });
  }
  return grad_input;
}

at::Tensor conv_weight_grad_gemm_cpu(const at::Tensor& input_, const at::Tensor& grad_output_,
                                     at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation, std::optional<at::MemoryFormat> weight_format) {
  const char* op = "conv_weight_grad_gemm";
  check_operand(op, "input", input_, input_.scalar_type());
  check_operand(op, "grad_output", grad_output_, input_.scalar_type());
  const Geometry g = geometry_of(op, input_.sizes(), kernel_size, stride, padding, dilation);
  const int64_t out_channels = grad_output_.size(1), pixels = g.pixels();
  TORCH_CHECK(grad_output_.size(0) == g.images && grad_output_.size(2) == g.out_h && grad_output_.size(3) == g.out_w,
              "fused_resnet::", op, ": expected grad_output of shape [", g.images, ", K, ", g.out_h, ", ", g.out_w,
              "] (the convolution's output), got ", grad_output_.sizes());
  const auto format = layout_of(input_);
  const at::MemoryFormat result_format = weight_format.value_or(format);
  const bool pointwise_kernel = g.kernel_h == 1 && g.kernel_w == 1;
  TORCH_CHECK(result_format == at::MemoryFormat::Contiguous ||
                  (result_format == at::MemoryFormat::ChannelsLast &&
                   (format == at::MemoryFormat::ChannelsLast || pointwise_kernel)),
              "fused_resnet::", op, ": expected weight_format torch.contiguous_format, or torch.channels_last for a ",
              "channels_last input or a 1x1 kernel, got ", result_format, " for a ", format, " input");
  const PatchOrder order = patch_order(format, result_format);
  const at::Tensor input = input_.contiguous(format);
  const at::Tensor grad_output = grad_output_.contiguous(format);
  const int64_t piece = g.piece_images(input.element_size());
  // Pieces accumulate in the GEMM's dtype, or in float32 for bfloat16 and float16 (each piece's product rounded
  // once, as its smaller sum, then the total once).
  const bool low_precision = at::isReducedFloatingType(input.scalar_type()) && g.images > piece;
  at::Tensor grad_weight = at::empty({out_channels, g.patch()},
                                     low_precision ? input.options().dtype(at::kFloat) : input.options());
  if (g.images == 0 || low_precision) {
    grad_weight.zero_();
  }
  for (int64_t first = 0; first < g.images; first += piece) {
    const int64_t count = std::min(piece, g.images - first);
    at::Tensor col, rows;  // (count * pixels, patch) and (K, count * pixels)
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "conv_weight_grad_gemm", [&] {
      if (format == at::MemoryFormat::ChannelsLast) {
        if (g.pointwise()) {
          col = pixel_rows(input, first, count);
        } else {
          col = at::empty({count * pixels, g.patch()}, input.options());
          im2col_channels_last(input.const_data_ptr<scalar_t>(), g, first, count, order,
                               col.mutable_data_ptr<scalar_t>());
        }
        rows = pixel_rows(grad_output, first, count).t();
      } else {
        col = at::empty({g.patch(), count * pixels}, input.options());
        im2col_contiguous(input.const_data_ptr<scalar_t>(), g, first, count, col.mutable_data_ptr<scalar_t>());
        col = col.t();
        rows = at::empty({out_channels, count * pixels}, input.options());
        pack_channels(grad_output.const_data_ptr<scalar_t>(), out_channels, pixels, first, count,
                      rows.mutable_data_ptr<scalar_t>());
      }
    });
    if (low_precision) {
      grad_weight.add_(at::mm(rows, col));
    } else if (first == 0) {
      at::mm_out(grad_weight, rows, col);
    } else {
      grad_weight.addmm_(rows, col);
    }
  }
  if (low_precision) {
    grad_weight = grad_weight.to(input.scalar_type());
  }
  // A 1x1 kernel's two patch orders are one: its gradient takes the strides asked for (they differ in the size-1
  // dimensions, and a parameter's gradient must have the parameter's).
  if (pointwise_kernel ? result_format == at::MemoryFormat::ChannelsLast : order == PatchOrder::kKernelMajor) {
    return grad_weight.view({out_channels, g.kernel_h, g.kernel_w, g.channels}).permute({0, 3, 1, 2});
  }
  return grad_weight.view({out_channels, g.channels, g.kernel_h, g.kernel_w});
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) {
  m.impl("conv_gemm", &conv_gemm_cpu);
  m.impl("conv_input_grad_gemm", &conv_input_grad_gemm_cpu);
  m.impl("conv_weight_grad_gemm", &conv_weight_grad_gemm_cpu);
}

}  // namespace fused_resnet
