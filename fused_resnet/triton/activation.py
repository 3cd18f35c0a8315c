"""The ReLU every Triton kernel applies: PyTorch's, which keeps NaN."""

import triton
import triton.language as tl


@triton.jit
def relu(v):
    # tl.maximum(v, 0) compiles to max.f32, which returns the non-NaN operand (the interpreter's np.fmax does the
    # same), so a NaN activation would come out 0 where torch, cpu and cuda give NaN: compare instead, so that NaN
    # takes the `v` branch.
    return tl.where(v < 0, 0.0, v)
