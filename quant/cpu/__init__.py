"""Numba CPU kernels: activation quantization, fused quantized matmuls, dequantization."""
