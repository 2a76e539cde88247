"""Tensor types and block formats (numpy references); Numba kernels in `quant.cpu`."""
