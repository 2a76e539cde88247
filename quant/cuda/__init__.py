"""numba.cuda kernels: the GPU twins of `quant.cpu` (DESIGN principle 5). Imported only when a
model is loaded with device="cuda" (they import numba.cuda, which needs the `cuda` extra)."""
