"""The Triton backend: @triton.jit kernels and their launchers (statistics, BN-apply/residual/ReLU, convolution)."""
